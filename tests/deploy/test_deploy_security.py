"""Deploy manifests, security side: hardened containers, no secret values, NetworkPolicies, checkov."""
from __future__ import annotations

import copy
import functools
import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import yaml

from tests.test_deploy import DEPLOY, OVERLAYS, REPO, _render_text, pod_specs, ray_pod_specs, render, walk

SECRETISH = re.compile(r"PASSWORD|TOKEN|SECRET|_KEY\b|_KEY_ID\b|CREDENTIAL", re.IGNORECASE)
CHECKOV_TIMEOUT_S = 300


# --- hardening and secrets -----------------------------------------------------------------------

def containers_of(pod: dict) -> list[dict]:
    return pod.get("initContainers", []) + pod["containers"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_containers_are_hardened(overlay):
    docs = render(overlay)
    problems = []
    checked = dict(pod_specs(docs))
    for d in docs:
        if d["kind"] == "RayCluster":   # the autoscaler sidecar KubeRay builds from these options
            opts = d["spec"]["autoscalerOptions"]
            checked["RayCluster/autoscaler"] = {"securityContext": {}, "containers": [
                {"name": "autoscaler", **{k: opts[k] for k in ("securityContext", "resources")}}]}
    for where, pod in checked.items():
        pod_sc = pod.get("securityContext", {})
        for c in containers_of(pod):
            sc = {**pod_sc, **c.get("securityContext", {})}
            name = f"{where}/{c['name']}"
            if sc.get("runAsNonRoot") is not True or not sc.get("runAsUser"):
                problems.append(f"{name}: not runAsNonRoot with a non-zero runAsUser")
            if c.get("securityContext", {}).get("allowPrivilegeEscalation") is not False:
                problems.append(f"{name}: allowPrivilegeEscalation is not false")
            if c.get("securityContext", {}).get("capabilities", {}).get("drop") != ["ALL"]:
                problems.append(f"{name}: capabilities do not drop ALL")
            if sc.get("seccompProfile", {}).get("type") != "RuntimeDefault":
                problems.append(f"{name}: seccompProfile is not RuntimeDefault")
            if c.get("securityContext", {}).get("readOnlyRootFilesystem") is not True:
                problems.append(f"{name}: root filesystem is writable")
            for part in ("requests", "limits"):
                if not {"cpu", "memory"} <= set(c.get("resources", {}).get(part, {})):
                    problems.append(f"{name}: no cpu and memory {part}")
    assert not problems, "\n".join(problems)


def secret_leaks(docs: list[dict]) -> list[str]:
    """Where rendered objects carry a secret value instead of a reference to a Secret."""
    problems = [f"Secret/{d['metadata']['name']}: rendered; create it with `kubectl create secret`"
                for d in docs if d["kind"] == "Secret"]
    for d in docs:
        where = f"{d['kind']}/{d['metadata']['name']}"
        secret_volumes = {n["name"] for _, n in walk(d) if isinstance(n.get("secret"), dict)}
        secret_dirs = tuple(n["mountPath"] + "/" for _, n in walk(d)
                            if "mountPath" in n and n.get("name") in secret_volumes)
        for path, node in walk(d):
            for var in node.get("env", []) if isinstance(node.get("env"), list) else []:
                if not SECRETISH.search(var["name"]):
                    continue
                if var["name"].endswith("_FILE"):   # a path: it must point into a mounted Secret
                    if not secret_dirs or not var.get("value", "").startswith(secret_dirs):
                        problems.append(f"{where}{path}: {var['name']} is not in a Secret volume")
                elif "secretKeyRef" not in var.get("valueFrom", {}):
                    problems.append(f"{where}{path}: {var['name']} is not from a secretKeyRef")
            for key, value in node.items():
                # user:password@host in a URI is fine only as a $(VAR) that the kubelet expands.
                for m in re.finditer(r"://[^/\s:@]+:([^@\s]+)@", value if isinstance(value, str) else ""):
                    if not re.fullmatch(r"\$\([A-Z_][A-Z0-9_]*\)", m.group(1)):
                        problems.append(f"{where}{path}.{key}: a literal credential in a URI")
    return problems


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_secret_values_in_rendered_manifests(overlay):
    leaks = secret_leaks(render(overlay))
    assert not leaks, "\n".join(leaks)


def test_secret_leak_check_finds_literals():
    docs = render(OVERLAYS[0])
    mlflow = next(d for d in docs if d["kind"] == "Deployment")
    env = mlflow["spec"]["template"]["spec"]["containers"][0]["env"]
    env.append({"name": "MLFLOW_TRACKING_PASSWORD", "value": "hunter2"})
    env.append({"name": "DB", "value": "postgresql://mlflow:hunter2@postgres:5432/mlflow"})
    docs.append({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "x"},
                 "stringData": {"password": "hunter2"}})
    leaks = "\n".join(secret_leaks(docs))
    assert "MLFLOW_TRACKING_PASSWORD is not from a secretKeyRef" in leaks
    assert "literal credential in a URI" in leaks and "Secret/x" in leaks


def referenced_secrets(docs: list[dict]) -> dict[str, set[str]]:
    """Secret name -> the keys the manifests read from it."""
    refs: dict[str, set[str]] = {}
    for d in docs:
        for _, node in walk(d):
            ref = node.get("secretKeyRef")
            if isinstance(ref, dict):
                refs.setdefault(ref["name"], set()).add(ref["key"])
            secret = node.get("secret")
            if isinstance(secret, dict) and "secretName" in secret:
                keys = {i["key"] for i in secret.get("items", [])}
                refs.setdefault(secret["secretName"], set()).update(keys)
        if d["kind"] == "RayCluster":   # KubeRay reads the token from the `auth_token` key
            refs.setdefault(d["spec"]["authOptions"]["secretName"], set()).add("auth_token")
    return refs


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_readme_creates_every_secret_the_manifests_read(overlay):
    readme = (DEPLOY / "README.md").read_text()
    commands = {}   # secret name -> its `kubectl create secret generic` command, continuation lines too
    for m in re.finditer(r"create secret generic (\S+)", readme):
        end = min(i for i in (readme.find("\n\n", m.start()), readme.find("\n```", m.start()),
                              len(readme)) if i >= 0)
        commands[m.group(1)] = readme[m.start():end]
    missing = []
    for name, keys in referenced_secrets(render(overlay)).items():
        if name not in commands:
            missing.append(f"no `kubectl create secret generic {name}` in deploy/README.md")
            continue
        missing += [f"secret {name}: key {k} is not created in deploy/README.md"
                    for k in keys if f"--from-literal={k}=" not in commands[name]]
    assert not missing, "\n".join(missing)


# --- network policies ----------------------------------------------------------------------------

def test_minio_reads_its_root_account_from_secret_files():
    """The cpu overlay's MinIO takes its root account (MLflow's S3 keys) from the Secret MLflow reads
    them from, mounted as files (MINIO_ROOT_*_FILE), never from environment variables."""
    pods = pod_specs(render("cpu"))
    (minio,) = pods["Deployment/minio"]["containers"]
    env = {e["name"]: e for e in minio["env"]}
    assert not {"MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD", "MINIO_ACCESS_KEY", "MINIO_SECRET_KEY"} & set(env)
    mounts = {m["name"]: m for m in minio["volumeMounts"]}
    files = {f"{mounts[v['name']]['mountPath']}/{item['path']}": (v["secret"]["secretName"], item["key"])
             for v in pods["Deployment/minio"]["volumes"]
             if "secret" in v and mounts[v["name"]].get("readOnly") for item in v["secret"]["items"]}
    mlflow = {e["name"]: e for e in pods["Deployment/mlflow"]["containers"][0]["env"]}
    for file_var, s3_var in (("MINIO_ROOT_USER_FILE", "AWS_ACCESS_KEY_ID"),
                             ("MINIO_ROOT_PASSWORD_FILE", "AWS_SECRET_ACCESS_KEY")):
        ref = mlflow[s3_var]["valueFrom"]["secretKeyRef"]
        assert files.get(env[file_var]["value"]) == (ref["name"], ref["key"]), \
            f"{file_var} is not MLflow's {s3_var}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies(overlay):
    docs = render(overlay)
    policies = {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "NetworkPolicy"}
    deny = [p for p in policies.values() if p["podSelector"] == {} and "ingress" not in p]
    assert deny and "Ingress" in deny[0]["policyTypes"], "no default deny of ingress"

    def rules_for(pods: dict) -> list[dict]:
        """Ingress rules of the policies that select exactly these pod labels."""
        return [r for p in policies.values() if p["podSelector"].get("matchLabels") == pods
                for r in p.get("ingress", [])]

    ray = {"app.kubernetes.io/component": "ray"}
    dashboard = rules_for({**ray, "ray.io/node-type": "head"})
    assert dashboard and all([pt["port"] for pt in r["ports"]] == [8265] for r in dashboard)
    for r in dashboard:
        for peer in r["from"]:
            assert set(peer) == {"namespaceSelector"}, peer
            labels = peer["namespaceSelector"]["matchLabels"]
            assert labels in ({"schedtune.io/submitter": "true"},
                              {"kubernetes.io/metadata.name": "kuberay-system"}), labels
    (internal,) = rules_for(ray)
    assert internal["from"] == [{"podSelector": {"matchLabels": ray}}] and "ports" not in internal
    (postgres,) = rules_for({"app.kubernetes.io/name": "postgres"})
    assert postgres["from"] == [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "mlflow"}}}]
    assert [pt["port"] for pt in postgres["ports"]] == [5432]
    (mlflow,) = rules_for({"app.kubernetes.io/name": "mlflow"})
    assert [pt["port"] for pt in mlflow["ports"]] == [5000]
    assert {"podSelector": {"matchLabels": ray}} in mlflow["from"]
    assert all("podSelector" in peer or "namespaceSelector" in peer for peer in mlflow["from"])
    # The object store (cpu overlay: MinIO) answers MLflow only, on its S3 port; Ray pods never reach it.
    store = rules_for({"app.kubernetes.io/name": "minio"})
    if any(d["kind"] == "Deployment" and d["metadata"]["name"] == "minio" for d in docs):
        mlflow_pods = {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "mlflow"}}}
        assert [r["from"] for r in store] == [[mlflow_pods]]
        assert [pt["port"] for pt in store[0]["ports"]] == [9000]
    else:
        assert not store, f"{overlay}: a MinIO policy without MinIO"


# --- checkov -------------------------------------------------------------------------------------

def checkov_executable() -> str | None:
    for candidate in (os.environ.get("CHECKOV"), shutil.which("checkov"),
                      REPO / ".venv-checkov" / "bin" / "checkov"):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def ray_pods_for_checkov(docs: list[dict]) -> list[dict]:
    """Checkov does not read KubeRay resources: give it the Ray pods as the operator makes them
    from the RayCluster's templates (the RayJob's cluster is the same spec, tested above)."""
    pods = []
    for d in docs:
        if d["kind"] != "RayCluster":
            continue
        for group, spec in ray_pod_specs(d["spec"]).items():
            spec = copy.deepcopy(spec)
            if group == "head" and d["spec"].get("enableInTreeAutoscaling"):
                opts = d["spec"]["autoscalerOptions"]
                spec["containers"].append({
                    "name": "autoscaler", "image": spec["containers"][0]["image"],
                    "imagePullPolicy": spec["containers"][0].get("imagePullPolicy"),
                    **{k: opts[k] for k in ("env", "resources", "securityContext", "volumeMounts")
                       if k in opts}})
            pods.append({"apiVersion": "v1", "kind": "Pod",
                         "metadata": {"name": f"ray-{d['metadata']['name']}-{group}",
                                      "namespace": d["metadata"]["namespace"]},
                         "spec": spec})
    return pods


@functools.cache
def checkov_failures(overlay: str) -> frozenset[tuple[str, str]]:
    """(check id, resource id) of every failed checkov check on the rendered overlay."""
    exe = checkov_executable()
    if exe is None:
        pytest.skip("checkov is not installed (pip install checkov, or a venv at .venv-checkov)")
    docs = render(overlay)
    env = {**os.environ, "BC_SKIP_MAPPING": "TRUE", "CHECKOV_RUN_SCA_PACKAGE_SCAN_V2": "false",
           "LOG_LEVEL": "WARNING"}
    env.pop("BC_API_KEY", None)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / f"{overlay}.yaml").write_text(_render_text(overlay))
        (Path(tmp) / "ray-pods.yaml").write_text(yaml.safe_dump_all(ray_pods_for_checkov(docs)))
        proc = subprocess.run(
            [exe, "-d", tmp, "--framework", "kubernetes", "-o", "json", "--quiet",
             "--skip-download"],
            capture_output=True, text=True, env=env, timeout=CHECKOV_TIMEOUT_S)
    assert proc.returncode in (0, 1), f"checkov failed to run:\n{proc.stderr[-3000:]}"
    report = json.loads(proc.stdout)
    reports = report if isinstance(report, list) else [report]
    assert any(r.get("summary", {}).get("resource_count", 0) > 0 for r in reports), \
        f"checkov scanned nothing:\n{proc.stdout[:2000]}"
    assert not any(r.get("summary", {}).get("parsing_errors") for r in reports), proc.stdout[:2000]
    return frozenset((c["check_id"], c["resource"])
                     for r in reports for c in r.get("results", {}).get("failed_checks", []))


def checkov_skips() -> dict[str, dict]:
    return yaml.safe_load((DEPLOY / "checkov-skips.yaml").read_text()) or {}


def excused(check_id: str, resource: str, skips: dict[str, dict]) -> bool:
    skip = skips.get(check_id)
    return bool(skip) and ("resources" not in skip or resource in skip["resources"])


def test_checkov_skips_have_reasons():
    for check_id, skip in checkov_skips().items():
        assert re.fullmatch(r"CKV2?_K8S_\d+", check_id), f"{check_id}: not a checkov K8s check id"
        assert isinstance(skip, dict) and str(skip.get("reason", "")).strip(), \
            f"{check_id}: a skip needs a reason"
        assert set(skip) <= {"reason", "resources"}, f"{check_id}: unknown keys {set(skip)}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_checkov_reports_only_listed_failures(overlay):
    skips = checkov_skips()
    unlisted = sorted(f"{cid} on {res}" for cid, res in checkov_failures(overlay)
                      if not excused(cid, res, skips))
    assert not unlisted, ("checkov findings not in deploy/checkov-skips.yaml (fix them, or list them "
                          "with a reason):\n" + "\n".join(unlisted))


def test_checkov_skips_are_all_needed():
    failures = set().union(*(checkov_failures(o) for o in OVERLAYS))
    stale = []
    for check_id, skip in checkov_skips().items():
        hits = {res for cid, res in failures if cid == check_id}
        if not hits:
            stale.append(f"{check_id}: no overlay fails it any more")
        stale += [f"{check_id}: {res} no longer fails it"
                  for res in skip.get("resources", []) if res not in hits]
    assert not stale, "remove from deploy/checkov-skips.yaml:\n" + "\n".join(stale)
