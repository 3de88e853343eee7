"""Offline checks of the Kubernetes deployment in deploy/ (no API server needed).

Every overlay must render with `kubectl kustomize`; its core objects must validate strictly against
Kubernetes' own schemas (kubernetes-validate) and its KubeRay objects against the KubeRay v1.7 CRD
schemas in ../shared/k8s-schemas/, made strict; checkov may report only the findings listed, with a
reason, in deploy/checkov-skips.yaml; commands in the image and the RayJob must be commands the
`schedtune` CLI has; and no secret value may appear in what is rendered.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import re
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import yaml

try:
    import tomllib
except ModuleNotFoundError:   # Python 3.10
    tomllib = pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
OVERLAYS = sorted(p.parent.name for p in (DEPLOY / "overlays").glob("*/kustomization.yaml"))
KUBERAY_SCHEMAS = REPO.parent / "shared" / "k8s-schemas"
CRD_SCHEMA_FILES = {"RayCluster": "raycluster_v1.json", "RayJob": "rayjob_v1.json",
                    "RayService": "rayservice_v1.json"}
K8S_VERSION = "1.32"         # a version kubernetes-validate bundles; the kubectl here is 1.32
NAMESPACE = "schedtune"
IMAGE_HOME = "/home/ray/schedtune"   # WORKDIR of deploy/Dockerfile: the repository's copy
SECRETISH = re.compile(r"PASSWORD|TOKEN|SECRET|_KEY\b|_KEY_ID\b|CREDENTIAL", re.IGNORECASE)
CHECKOV_TIMEOUT_S = 300


# --- rendering -----------------------------------------------------------------------------------

def _kubectl() -> str:
    exe = shutil.which("kubectl")
    if exe is None:
        pytest.skip("kubectl is not installed: cannot render the kustomize overlays")
    return exe


@functools.cache
def _render_text(overlay: str) -> str:
    proc = subprocess.run([_kubectl(), "kustomize", str(DEPLOY / "overlays" / overlay)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"kubectl kustomize deploy/overlays/{overlay} failed:\n{proc.stderr}"
    return proc.stdout


def render(overlay: str) -> list[dict]:
    """The overlay's objects, as `kubectl kustomize` renders them (a fresh copy per call)."""
    return [d for d in yaml.safe_load_all(_render_text(overlay)) if d]


def one(docs: list[dict], kind: str) -> dict:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def ray_pod_specs(cluster_spec: dict) -> dict[str, dict]:
    """Pod specs of a RayCluster spec by group: 'head', 'worker-<groupName>'."""
    specs = {"head": cluster_spec["headGroupSpec"]["template"]["spec"]}
    for group in cluster_spec.get("workerGroupSpecs", []):
        specs[f"worker-{group['groupName']}"] = group["template"]["spec"]
    return specs


def pod_specs(docs: list[dict]) -> dict[str, dict]:
    """Every pod spec the overlay defines, core workloads and Ray pods alike."""
    specs = {}
    for d in docs:
        name = f"{d['kind']}/{d['metadata']['name']}"
        if d["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            specs[name] = d["spec"]["template"]["spec"]
        elif d["kind"] == "RayCluster":
            specs.update({f"{name}/{g}": s for g, s in ray_pod_specs(d["spec"]).items()})
        elif d["kind"] == "RayJob":
            specs.update({f"{name}/{g}": s
                          for g, s in ray_pod_specs(d["spec"]["rayClusterSpec"]).items()})
    return specs


def walk(node, path=""):
    """Yield (path, dict) for every mapping inside node."""
    if isinstance(node, dict):
        yield path, node
        for k, v in node.items():
            yield from walk(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from walk(v, f"{path}[{i}]")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders(overlay):
    docs = render(overlay)
    kinds = {d["kind"] for d in docs}
    assert {"RayCluster", "RayJob", "Deployment", "StatefulSet", "Service",
            "NetworkPolicy", "PersistentVolumeClaim"} <= kinds
    for d in docs:
        assert d.get("apiVersion") and d["metadata"].get("name"), d
        if d["kind"] != "Namespace":
            assert d["metadata"].get("namespace") == NAMESPACE, f"{d['kind']}/{d['metadata']['name']}"


def test_overlays_exist():
    assert set(OVERLAYS) >= {"cpu", "gpu"}


# --- schemas -------------------------------------------------------------------------------------

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_core_objects_validate_strictly(overlay):
    import kubernetes_validate

    errors = []
    for d in render(overlay):
        if d["apiVersion"].split("/")[0].endswith("ray.io"):
            continue
        try:
            kubernetes_validate.validate(d, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            errors.append(f"{d['kind']}/{d['metadata']['name']}: {path}: {e.message}")
    assert not errors, "\n".join(errors)


def strict(schema):
    """The schema with additionalProperties: false on every object schema that lists properties
    and does not preserve unknown fields, as the API server's strict field validation behaves."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@functools.cache
def kuberay_validator(kind: str):
    import jsonschema

    schema = json.loads((KUBERAY_SCHEMAS / CRD_SCHEMA_FILES[kind]).read_text())
    return jsonschema.Draft7Validator(strict(schema))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ray_objects_validate_against_kuberay_crds(overlay):
    if not KUBERAY_SCHEMAS.is_dir():
        pytest.skip(f"KubeRay CRD schemas not found at {KUBERAY_SCHEMAS} (they live in the "
                    "project's shared/ folder beside the repository, not in a clone)")
    ray_docs = [d for d in render(overlay) if d["apiVersion"].split("/")[0] == "ray.io"]
    assert ray_docs
    errors = []
    for d in ray_docs:
        assert d["apiVersion"] == "ray.io/v1" and d["kind"] in CRD_SCHEMA_FILES, d["kind"]
        for e in kuberay_validator(d["kind"]).iter_errors(d):
            path = ".".join(str(p) for p in e.absolute_path)
            errors.append(f"{d['kind']}/{d['metadata']['name']}: {path}: {e.message}")
    assert not errors, "\n".join(errors)


def test_strict_schema_rejects_unknown_fields():
    """The strict KubeRay check is strict: a misspelt field is an error."""
    if not KUBERAY_SCHEMAS.is_dir():
        pytest.skip(f"KubeRay CRD schemas not found at {KUBERAY_SCHEMAS}")
    cluster = one(render(OVERLAYS[0]), "RayCluster")
    cluster["spec"]["headGroupSpec"]["rayStartParms"] = {}
    cluster["spec"]["authOptions"]["secret"] = "x"
    messages = [e.message for e in kuberay_validator("RayCluster").iter_errors(cluster)]
    assert any("rayStartParms" in m for m in messages), messages
    assert any("'secret'" in m for m in messages), messages


# --- what the Ray objects must say ---------------------------------------------------------------

def pinned_ray_version() -> str:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = [re.match(r"ray(\[[^\]]*\])?==([\w.]+)$", d.replace(" ", "")) for d in deps]
    versions = [m.group(2) for m in pins if m]
    assert len(versions) == 1, f"pyproject.toml should pin ray exactly once: {deps}"
    return versions[0]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_raycluster_shape(overlay):
    docs = render(overlay)
    cluster, job = one(docs, "RayCluster"), one(docs, "RayJob")
    spec = cluster["spec"]
    assert spec["rayVersion"] == pinned_ray_version()
    assert spec["authOptions"]["mode"] == "token" and spec["authOptions"]["secretName"]
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0", "the head must not train"
    assert spec["enableInTreeAutoscaling"] is True
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert "cpu" in groups
    for g in groups.values():
        assert 0 <= g["minReplicas"] <= g.get("replicas", g["minReplicas"]) <= g["maxReplicas"]
    gpu_groups = [g for g in groups.values()
                  if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]]
    if overlay == "cpu":
        assert not gpu_groups, "a laptop cluster has no GPU worker group"
        assert "nvidia.com/gpu" not in _render_text(overlay)
    else:
        assert gpu_groups, f"the {overlay} overlay needs a GPU worker group"
        for g in gpu_groups:
            pod = g["template"]["spec"]
            assert pod["nodeSelector"], "GPU workers need a node selector"
            assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
            assert g["maxReplicas"] > 0
    # The RayJob's cluster is the RayCluster's spec (kustomize replacements, after the patches).
    assert job["spec"]["rayClusterSpec"] == spec
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    assert job["spec"]["ttlSecondsAfterFinished"] > 0


def rayjob_search_space(job: dict) -> Path:
    """The repository file behind the RayJob's search-space argument (the image's copy of it)."""
    spec_file = shlex.split(job["spec"]["entrypoint"])[2]
    assert spec_file.startswith(f"{IMAGE_HOME}/search_spaces/"), spec_file
    return REPO / Path(spec_file).relative_to(IMAGE_HOME)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ray_pods_share_the_results_and_data_volumes(overlay):
    """Every Ray pod mounts the same claim at --storage and at the search space's data root."""
    docs = render(overlay)
    job = one(docs, "RayJob")
    argv = shlex.split(job["spec"]["entrypoint"])
    paths = [argv[argv.index("--storage") + 1]]
    space = rayjob_search_space(job)
    if space.is_file():   # a missing file is reported by test_rayjob_entrypoint_is_a_schedtune_command
        root = yaml.safe_load(space.read_text())["train"]["data"].get("root")
        if root and root.startswith("/"):
            paths.append(root)
    claims = {d["metadata"]["name"]: d for d in docs if d["kind"] == "PersistentVolumeClaim"}
    for path in paths:
        used = set()
        for name, pod in ray_pod_specs(one(docs, "RayCluster")["spec"]).items():
            volumes = {v["name"]: v for v in pod["volumes"]}
            mounts = [m for m in pod["containers"][0]["volumeMounts"]
                      if path == m["mountPath"] or path.startswith(m["mountPath"] + "/")]
            assert mounts, f"{name} does not mount {path}"
            mount = max(mounts, key=lambda m: len(m["mountPath"]))
            used.add(volumes[mount["name"]]["persistentVolumeClaim"]["claimName"])
        (claim,) = used
        assert claim in claims, f"{path}: no PersistentVolumeClaim {claim}"
        if overlay != "cpu":   # cpu: one kind node, where ReadWriteOnce is shared by all pods
            assert "ReadWriteMany" in claims[claim]["spec"]["accessModes"], claim


# --- commands ------------------------------------------------------------------------------------

def console_scripts() -> dict[str, str]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]


def cli_parser():
    from tuning.cli import build_parser   # written alongside; its contract is build_parser()

    return build_parser()


def subcommands(parser) -> set[str]:
    import argparse

    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert actions, "the schedtune parser has no subcommands"
    return set(actions[0].choices)


def parse_entrypoint(entrypoint: str):
    """(argv, argparse.Namespace) of a `schedtune ...` command line; fails on an unknown flag."""
    argv = shlex.split(entrypoint)
    assert argv[0] == "schedtune" and argv[0] in console_scripts(), argv
    parser = cli_parser()
    assert argv[1] in subcommands(parser), f"{argv[1]!r} is not a schedtune subcommand"
    try:
        return argv, parser.parse_args(argv[1:])
    except SystemExit as e:
        pytest.fail(f"schedtune rejects the command line {entrypoint!r} (exit {e.code})")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rayjob_entrypoint_is_a_schedtune_command(overlay):
    job = one(render(overlay), "RayJob")
    argv, args = parse_entrypoint(job["spec"]["entrypoint"])
    assert argv[1] == "tune"
    assert args.tracking_uri == "http://mlflow:5000"
    assert args.storage == "/mnt/results"
    assert ("--smoke" in argv) == (overlay == "cpu")
    in_repo = rayjob_search_space(job)
    assert in_repo.is_file(), f"the RayJob runs {argv[2]}, but {in_repo} does not exist"


def readme_schedtune_commands() -> list[str]:
    """`schedtune ...` command lines in deploy/README.md: in shell blocks and in inline code."""
    readme = (DEPLOY / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", readme, flags=re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip().startswith("schedtune "):
                commands.append(line.strip())
    commands += re.findall(r"`(schedtune [^`]+)`", readme)
    return commands


def test_readme_schedtune_commands_parse():
    commands = readme_schedtune_commands()
    assert any(" submit " in f" {c} " for c in commands), "deploy/README.md shows no submit"
    for command in commands:
        parse_entrypoint(command)


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1].strip())
            for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_image_command_is_a_schedtune_command():
    instructions = dockerfile_instructions()
    commands = [json.loads(arg) for op, arg in instructions if op in ("CMD", "ENTRYPOINT")]
    assert commands, "deploy/Dockerfile sets no CMD"
    argv = commands[-1]
    assert argv[0] in console_scripts(), f"{argv[0]!r} is not a console script of the package"
    if len(argv) > 1 and not argv[1].startswith("-"):
        assert argv[1] in subcommands(cli_parser())


def test_image_is_the_pinned_ray_image_and_not_root():
    instructions = dockerfile_instructions()
    args = dict(arg.split("=", 1) for op, arg in instructions if op == "ARG" and "=" in arg)
    assert args["RAY_VERSION"] == pinned_ray_version()
    assert args["PYTHON_TAG"] == "py311"
    (base,) = [arg for op, arg in instructions if op == "FROM"]
    assert base.startswith("rayproject/ray:${RAY_VERSION}-${PYTHON_TAG}-${RAY_VARIANT}")
    users = [arg for op, arg in instructions if op == "USER"]
    assert users and users[-1].split(":")[0] in ("1000", "ray")
    workdirs = [arg for op, arg in instructions if op == "WORKDIR"]
    assert workdirs[-1] == IMAGE_HOME


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

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies(overlay):
    policies = {d["metadata"]["name"]: d["spec"] for d in render(overlay)
                if d["kind"] == "NetworkPolicy"}
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
