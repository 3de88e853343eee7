"""Deploy manifests, security side: hardened containers and no secret values (tokens, images,
network policies and checkov: the test_deploy_<concept>.py beside this one)."""
from __future__ import annotations

import re

import pytest

from tests.deploy.test_deploy import DEPLOY, OVERLAYS, pod_specs, render, walk

SECRETISH = re.compile(r"PASSWORD|TOKEN|SECRET|_KEY\b|_KEY_ID\b|CREDENTIAL", re.IGNORECASE)


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
        # KubeRay reads a named token Secret's `auth_token` key; with no name it generates the
        # Secret itself (test_every_ray_cluster_gets_its_own_token), which nobody creates.
        if d["kind"] == "RayCluster" and d["spec"]["authOptions"].get("secretName"):
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
