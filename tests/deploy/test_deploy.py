"""Offline checks of the Kubernetes deployment in deploy/ (no API server needed): what renders.

Every overlay must render with `kubectl kustomize`; its core objects must validate strictly against
Kubernetes' own schemas (kubernetes-validate) and its KubeRay objects against the KubeRay v1.7 CRD
schemas vendored in deploy/schemas/kuberay-v1.7.0/, made strict; the Ray objects, the shared volumes and the cpu
overlay's object store must fit together. Commands in the image, the RayJob and deploy/README.md are
checked in tests/deploy/test_deploy_commands.py; the security side is in
test_deploy_security.py (hardened containers, no secret values, the Secrets the README creates),
test_deploy_tokens.py, test_deploy_images.py, test_deploy_network.py and test_deploy_checkov.py.
"""

from __future__ import annotations

import functools
import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

try:
    import tomllib
except ModuleNotFoundError:   # Python 3.10
    tomllib = pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
OVERLAYS = sorted(p.parent.name for p in (DEPLOY / "overlays").glob("*/kustomization.yaml"))
KUBERAY_SCHEMAS = DEPLOY / "schemas" / "kuberay-v1.7.0"   # vendored: a fresh clone validates too
CRD_SCHEMA_FILES = {"RayCluster": "raycluster_v1.json", "RayJob": "rayjob_v1.json",
                    "RayService": "rayservice_v1.json"}
K8S_VERSION = "1.32"         # a version kubernetes-validate bundles; the kubectl here is 1.32
NAMESPACE = "schedtune"
CLUSTER_SCOPED = {"Namespace", "StorageClass", "PriorityClass"}   # kinds with no namespace
IMAGE_HOME = "/home/ray/schedtune"   # WORKDIR of deploy/Dockerfile: the repository's copy


# --- rendering -----------------------------------------------------------------------------------

def _kubectl() -> str:
    exe = shutil.which("kubectl")
    if exe is None:
        pytest.skip("kubectl is not installed: cannot render the kustomize overlays")
    return exe


@functools.cache
def _render_text(overlay: str) -> str:
    """`kubectl kustomize` of deploy/overlays/<overlay>, or of deploy/base for overlay="base"."""
    where = "base" if overlay == "base" else f"overlays/{overlay}"
    proc = subprocess.run([_kubectl(), "kustomize", str(DEPLOY / where)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"kubectl kustomize deploy/{where} failed:\n{proc.stderr}"
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
        elif d["kind"] == "CronJob":
            specs[name] = d["spec"]["jobTemplate"]["spec"]["template"]["spec"]
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
    assert {"RayCluster", "RayJob", "Deployment", "StatefulSet", "Service", "CronJob",
            "NetworkPolicy", "PersistentVolumeClaim", "PodDisruptionBudget", "PriorityClass",
            "StorageClass"} <= kinds
    for d in docs:
        assert d.get("apiVersion") and d["metadata"].get("name"), d
        where = f"{d['kind']}/{d['metadata']['name']}"
        if d["kind"] in CLUSTER_SCOPED:
            assert "namespace" not in d["metadata"], f"{where} is cluster-scoped"
        else:
            assert d["metadata"].get("namespace") == NAMESPACE, where


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
    cluster = one(render(OVERLAYS[0]), "RayCluster")
    cluster["spec"]["headGroupSpec"]["rayStartParms"] = {}
    cluster["spec"]["authOptions"]["secret"] = "x"
    messages = [e.message for e in kuberay_validator("RayCluster").iter_errors(cluster)]
    assert any("rayStartParms" in m for m in messages), messages
    assert any("'secret'" in m for m in messages), messages


def test_vendored_schemas_are_the_ones_their_readme_names():
    """The vendored files are byte for byte the ones deploy/schemas/kuberay-v1.7.0/README.md lists
    (name and sha256), each the schema of the kind it is used for."""
    import hashlib

    listed = dict(re.findall(r"\| `(\w+_v1\.json)` \| \w+ \| `([0-9a-f]{64})` \|",
                             (KUBERAY_SCHEMAS / "README.md").read_text()))
    assert set(listed) == set(CRD_SCHEMA_FILES.values()), listed
    for kind, name in CRD_SCHEMA_FILES.items():
        data = (KUBERAY_SCHEMAS / name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == listed[name], f"{name} differs from the README's sha256"
        schema = json.loads(data)
        assert schema["properties"]["kind"]["type"] == "string" and "spec" in schema["properties"], name
    assert "Apache License" in (KUBERAY_SCHEMAS / "LICENSE").read_text()


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
    assert spec["authOptions"]["mode"] == "token"   # its Secret: test_deploy_tokens.py
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


# --- the artifact store --------------------------------------------------------------------------

def by_name(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_mlflow_artifacts_store(overlay):
    """The gpu overlay keeps MLflow's artifacts in an S3 bucket, with the keys MLflow needs as
    required references; the cpu overlay on a volume that MLflow alone mounts (no object store to
    run, patch or hold keys for), of the class that retains its disk, served through MLflow."""
    docs = render(overlay)
    (config,) = [d["data"] for d in docs if d["kind"] == "ConfigMap"
                 and d["metadata"]["name"].startswith("mlflow-config")]
    destination = config["MLFLOW_ARTIFACTS_DESTINATION"]
    assert "minio" not in {d["metadata"]["name"] for d in docs}, "MinIO's last image gets no patches"
    pods = pod_specs(docs)
    mlflow_pod = pods["Deployment/mlflow"]
    (server,) = mlflow_pod["containers"]
    assert "--serve-artifacts" in server["args"][-1]
    env = {e["name"]: e for e in server.get("env", [])}
    if overlay == "cpu":
        mounts = {m["mountPath"]: m["name"] for m in server["volumeMounts"]}
        assert destination in mounts, f"{destination} is not a mount of the MLflow container"
        volume = {v["name"]: v for v in mlflow_pod["volumes"]}[mounts[destination]]
        claim = by_name(docs, "PersistentVolumeClaim")[volume["persistentVolumeClaim"]["claimName"]]
        storage_class = by_name(docs, "StorageClass")[claim["spec"]["storageClassName"]]
        assert storage_class["reclaimPolicy"] == "Retain"
        assert by_name(docs, "Deployment")["mlflow"]["spec"]["strategy"]["type"] == "Recreate", \
            "a ReadWriteOnce volume: the old pod must let go before the new one mounts it"
        users = [name for name, pod in pods.items()
                 if any(v.get("persistentVolumeClaim", {}).get("claimName") == claim["metadata"]["name"]
                        for v in pod.get("volumes", []))]
        assert users == ["Deployment/mlflow"], users
        assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} & set(env)
        return
    bucket = re.fullmatch(r"s3://([a-z0-9][a-z0-9.-]{1,61}[a-z0-9])(/.*)?", destination)
    assert bucket, f"{overlay}: MLFLOW_ARTIFACTS_DESTINATION is not an s3:// bucket: {config}"
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        ref = env[key]["valueFrom"]["secretKeyRef"]
        assert ref["key"] == key and not ref.get("optional", False), \
            f"{key} must be required: without it the AWS SDK falls back to the node's role"
