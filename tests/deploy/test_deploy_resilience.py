"""Offline checks of deploy/, the production side (issue 19): what keeps an experiment alive and
MLflow's data safe, read from the rendered objects. A head restart must not rerun a RayJob from
trial 0; the head must not be evicted or preempted, and its GCS must survive a restart; PostgreSQL
is backed up onto a retained volume and MLflow migrates its schema before it starts; GPU pods fit
the node shapes deploy/README.md documents; a RayJob that cannot start fails instead of waiting a
day; a failed RayJob's cluster is kept long enough to read its logs; Prometheus can scrape Ray.
The backup and migration commands themselves run against real servers in test_deploy_backup.py.
"""

from __future__ import annotations

import re

import pytest
import yaml

from tests.deploy.test_deploy import DEPLOY, OVERLAYS, one, pod_specs, render
from tests.deploy.test_deploy_network import pod_labels, selects
from tests.deploy.test_deploy_security import containers_of
from tests.deploy.test_deploy_tokens import ray_cluster_specs


def by_name(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
_DECIMAL = {"k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "m": 1e-3}


def quantity(value) -> float:
    """A Kubernetes resource quantity ("500m", "24Gi", 8) as a number (cores, bytes)."""
    m = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(value))
    assert m, f"not a quantity: {value!r}"
    number, suffix = float(m.group(1)), m.group(2)
    if suffix in _BINARY:
        return number * _BINARY[suffix]
    assert suffix in _DECIMAL or suffix == "", f"unknown quantity suffix in {value!r}"
    return number * _DECIMAL.get(suffix, 1)


def test_quantity():
    assert quantity("500m") == 0.5 and quantity(8) == 8 and quantity("2") == 2
    assert quantity("24Gi") == 24 * 2**30 and quantity("512Mi") == 2**29 and quantity("1G") == 1e9
    with pytest.raises(AssertionError):
        quantity("8 cores")


# --- item 2: a head restart does not rerun the experiment ------------------------------------------

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rayjob_resubmission_resumes_instead_of_rerunning(overlay):
    """HTTPMode, because KubeRay's SidecarMode submitter container has no securityContext and the
    namespace enforces the restricted Pod Security level, which would reject the head pod. KubeRay
    may resubmit an HTTPMode job to a new head and retries a failed RayJob on a new cluster
    (backoffLimit): the entrypoint continues the run (test_deploy_commands.py checks the flag), and
    GCS fault tolerance keeps the job's record across a head restart."""
    docs = render(overlay)
    job = one(docs, "RayJob")["spec"]
    namespace = one(docs, "Namespace")["metadata"]["labels"]
    assert namespace["pod-security.kubernetes.io/enforce"] == "restricted"
    assert job["submissionMode"] == "HTTPMode"
    assert "--resume-if-present" in job["entrypoint"].split()
    assert job["backoffLimit"] >= 1, "a retry is what recovers a lost driver node"
    assert job["rayClusterSpec"]["gcsFaultToleranceOptions"]["backend"] in ("rocksdb", "redis")


# --- item 3: the head ------------------------------------------------------------------------------

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_heads_are_protected_from_eviction_and_preemption(overlay):
    """A PodDisruptionBudget that admits no voluntary eviction selects every head (the labels its
    template has plus the one KubeRay adds) and no worker; node autoscalers are told not to move
    heads; heads, MLflow and PostgreSQL run at a priority above the workers'."""
    docs = render(overlay)
    labels = pod_labels(docs)
    budgets = [d["spec"] for d in docs if d["kind"] == "PodDisruptionBudget"]
    head_budgets = [b for b in budgets if selects(b["selector"], labels["ray-head"])]
    assert len(head_budgets) == 1, head_budgets
    (budget,) = head_budgets
    assert budget.get("maxUnavailable") == 0 or str(budget.get("minAvailable")) == "100%", budget
    for name, pod in labels.items():
        if name.startswith("ray-worker"):
            assert not selects(budget["selector"], pod), f"the head budget also selects {name}"
    classes = by_name(docs, "PriorityClass")
    for name, cluster in ray_cluster_specs(docs).items():
        head = cluster["headGroupSpec"]["template"]
        annotations = head["metadata"]["annotations"]
        assert annotations["cluster-autoscaler.kubernetes.io/safe-to-evict"] == "false", name
        assert annotations["karpenter.sh/do-not-disrupt"] == "true", name
        priority = classes[head["spec"]["priorityClassName"]]
        assert priority["value"] > 0 and priority.get("globalDefault") is not True, name
        for group in cluster["workerGroupSpecs"]:
            assert "priorityClassName" not in group["template"]["spec"], \
                f"{name}: worker {group['groupName']} must stay preemptible"
    pods = pod_specs(docs)
    for workload in ("Deployment/mlflow", "StatefulSet/postgres"):
        assert pods[workload]["priorityClassName"] in classes, workload


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_head_gcs_survives_a_restart(overlay):
    """GCS fault tolerance with the embedded RocksDB store on a volume, and the operator values
    deploy/README.md installs KubeRay with enable the feature gate that backend needs (the operator
    rejects the cluster otherwise)."""
    docs = render(overlay)
    values = yaml.safe_load((DEPLOY / "kuberay-operator-values.yaml").read_text())
    gates = {g["name"]: g["enabled"] for g in values["featureGates"]}
    readme = (DEPLOY / "README.md").read_text()
    assert "-f deploy/kuberay-operator-values.yaml" in readme, "the README installs KubeRay without them"
    for name, cluster in ray_cluster_specs(docs).items():
        ft = cluster["gcsFaultToleranceOptions"]
        assert ft["backend"] == "rocksdb", name
        assert quantity(ft["storage"]["size"]) >= 2**30, name
        assert gates.get("GCSFaultToleranceEmbeddedStorage") is True
        head = cluster["headGroupSpec"]["template"]["spec"]
        assert not any(m["mountPath"] == "/data/gcs" for c in containers_of(head)
                       for m in c.get("volumeMounts", [])), "KubeRay mounts the GCS store itself"
    assert gates.get("RayJobDeletionPolicy") is True   # the RayJob's deletionStrategy.deletionRules


def test_head_is_sized_for_the_control_plane():
    """The gpu overlay's head: Guaranteed QoS (requests equal limits, the last evicted under memory
    pressure) with room for the GCS, the dashboard and the autoscaler's view of the cluster."""
    cluster = one(render("gpu"), "RayCluster")["spec"]
    (head,) = cluster["headGroupSpec"]["template"]["spec"]["containers"]
    resources = head["resources"]
    assert resources["requests"] == resources["limits"]
    assert quantity(resources["limits"]["memory"]) >= 8 * 2**30
    assert quantity(resources["limits"]["cpu"]) >= 2


# --- item 4: PostgreSQL's data ---------------------------------------------------------------------

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_postgres_is_backed_up_to_a_retained_volume(overlay):
    """A nightly CronJob runs the rendered backup script with the server's image, never two at a
    time, onto its own claim; that claim and PostgreSQL's data claim are of a class that keeps the
    disk when the claim or the namespace is deleted."""
    docs = render(overlay)
    cron = by_name(docs, "CronJob")["postgres-backup"]["spec"]
    assert re.fullmatch(r"\d+ \d+ \* \* \*", cron["schedule"]), "daily"
    assert cron["concurrencyPolicy"] == "Forbid" and "suspend" not in cron
    pod = cron["jobTemplate"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    postgres = pod_specs(docs)["StatefulSet/postgres"]["containers"][0]
    assert container["image"] == postgres["image"], "pg_dump must be the server's major version"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert container["args"] == ["/opt/schedtune/$(BACKUP_TASK).sh"] and env["BACKUP_TASK"] == "backup"
    assert set(env["BACKUP_DATABASES"].split()) == {"mlflow", "mlflow_auth"}
    assert int(env["RETAIN_DAYS"]) >= 7
    scripts = by_name(docs, "ConfigMap")["postgres-backup-scripts"]["data"]
    assert {"backup.sh", "restore.sh"} <= set(scripts)
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes[mounts["/opt/schedtune"]]["configMap"]["name"] == "postgres-backup-scripts"
    claims = by_name(docs, "PersistentVolumeClaim")
    backups = claims[volumes[mounts[env["BACKUP_DIR"]]]["persistentVolumeClaim"]["claimName"]]
    (data,) = by_name(docs, "StatefulSet")["postgres"]["spec"]["volumeClaimTemplates"]
    classes = by_name(docs, "StorageClass")
    for claim in (backups, data):
        storage_class = classes[claim["spec"]["storageClassName"]]
        assert storage_class["reclaimPolicy"] == "Retain", claim["metadata"]["name"]
    assert backups["metadata"]["name"] != data["metadata"]["name"]
    readme = (DEPLOY / "README.md").read_text()
    for step in ("--from=cronjob/postgres-backup", "BACKUP_TASK=restore",
                 "scale deployment/mlflow --replicas=0"):
        assert step in readme, f"deploy/README.md's restore steps lack {step!r}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_mlflow_migrates_its_database_before_it_starts(overlay):
    """An init container runs `mlflow db upgrade` with the server's image on the server's backend
    store URI, so a new MLflow image upgrades the schema instead of crash-looping on it."""
    pod = pod_specs(render(overlay))["Deployment/mlflow"]
    (init,) = pod["initContainers"]
    (server,) = pod["containers"]
    assert init["image"] == server["image"]
    assert '"upgrade", os.environ["MLFLOW_BACKEND_STORE_URI"]' in init["command"][-1]
    env = {e["name"]: e for e in init["env"]}
    server_env = {e["name"]: e for e in server["env"]}
    for key in ("MLFLOW_BACKEND_STORE_URI", "POSTGRES_PASSWORD"):
        assert env[key] == server_env[key], key


# --- item 6 ----------------------------------------------------------------------------------------

def documented_gpu_node_shapes() -> tuple[list[dict], float, float]:
    """deploy/README.md's "GPU node shapes": its table rows (allocatable CPU cores and GiB, GPUs)
    and the headroom it reserves for the node's DaemonSets (cores, GiB)."""
    readme = (DEPLOY / "README.md").read_text()
    section = readme[readme.index("### GPU node shapes"):]
    section = section[:section.index("\n## ")]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 7 and re.fullmatch(r"[\d.]+", cells[4]):
            rows.append({"node": f"{cells[0]} {cells[1]}", "gpus": int(cells[3]),
                         "cpu": float(cells[4]), "memory_gib": float(cells[5])})
    m = re.search(r"DaemonSet headroom: ([\d.]+) CPU and ([\d.]+) GiB", section)
    assert rows and m, "deploy/README.md: no GPU node shape table or no DaemonSet headroom"
    return rows, float(m.group(1)), float(m.group(2))


def test_gpu_workers_fit_the_documented_node_shapes():
    """A GPU worker's requests fit what each documented 1-GPU node has left for pods after the
    kubelet's reservations and the DaemonSets; Ray sizes itself by the limits, which equal the
    requests."""
    rows, headroom_cpu, headroom_gib = documented_gpu_node_shapes()
    assert len(rows) >= 3
    cluster = one(render("gpu"), "RayCluster")["spec"]
    gpu_groups = [g for g in cluster["workerGroupSpecs"]
                  if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]]
    assert gpu_groups
    for group in gpu_groups:
        resources = group["template"]["spec"]["containers"][0]["resources"]
        assert resources["requests"] == resources["limits"], group["groupName"]
        cpu = quantity(resources["requests"]["cpu"])
        memory_gib = quantity(resources["requests"]["memory"]) / 2**30
        gpus = int(resources["requests"]["nvidia.com/gpu"])
        for row in rows:
            assert gpus <= row["gpus"], row["node"]
            assert cpu <= row["cpu"] - headroom_cpu, \
                f"{group['groupName']}: {cpu} CPU does not fit {row['node']} ({row['cpu']} allocatable)"
            assert memory_gib <= row["memory_gib"] - headroom_gib, \
                f"{group['groupName']}: {memory_gib} GiB does not fit {row['node']} ({row['memory_gib']} GiB)"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_a_rayjob_that_cannot_start_fails_early(overlay):
    """If the job's cluster cannot come up (no GPU node for the GPU group's first replica), the
    RayJob fails after preRunningDeadlineSeconds, not after its day-long activeDeadlineSeconds."""
    job = one(render(overlay), "RayJob")["spec"]
    assert 0 < job["preRunningDeadlineSeconds"] <= 3600
    assert job["preRunningDeadlineSeconds"] < job["activeDeadlineSeconds"]
    if overlay == "gpu":
        (gpu,) = [g for g in job["rayClusterSpec"]["workerGroupSpecs"] if g["groupName"] == "gpu"]
        assert gpu["replicas"] >= 1, "the cluster must prove it can get a GPU before the job runs"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_a_failed_rayjob_keeps_its_cluster_for_its_logs(overlay):
    """The driver's log lives on the job cluster's head: a successful job's cluster goes within an
    hour, a failed one's stays at least a day. (Rules mode replaces shutdownAfterJobFinishes.)"""
    job = one(render(overlay), "RayJob")["spec"]
    assert "shutdownAfterJobFinishes" not in job and "ttlSecondsAfterFinished" not in job
    rules = {tuple(sorted((k, v) for k, v in r["condition"].items() if k != "ttlSeconds")):
             (r["policy"], r["condition"]["ttlSeconds"]) for r in job["deletionStrategy"]["deletionRules"]}
    policy, ttl = rules[(("jobStatus", "SUCCEEDED"),)]
    assert policy == "DeleteCluster" and 0 < ttl <= 3600
    policy, ttl = rules[(("jobDeploymentStatus", "Failed"),)]
    assert policy == "DeleteCluster" and ttl >= 86400


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ray_metrics_can_be_scraped(overlay):
    """Every Ray pod exposes Ray's metrics port and says so to Prometheus's pod discovery
    (test_deploy_network.py checks that the scraper namespaces are admitted to it)."""
    for name, cluster in ray_cluster_specs(render(overlay)).items():
        templates = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
        for template in templates:
            annotations = template["metadata"].get("annotations", {})
            assert annotations.get("prometheus.io/scrape") == "true", name
            assert annotations.get("prometheus.io/port") == "8080", name
        ports = {p["name"]: p["containerPort"] for p in
                 cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]}
        assert ports["metrics"] == 8080, name
