"""Deploy manifests: Kubernetes API tokens (the autoscaler's alone) and Ray tokens (one per cluster, drivers off the head)."""
from __future__ import annotations

import copy

import pytest

from tests.deploy.test_deploy import OVERLAYS, one, pod_specs, render, walk

from tests.deploy.test_deploy_security import containers_of


# --- Kubernetes API tokens and Ray tokens ---------------------------------------------------------

SA_TOKEN_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


def ray_cluster_specs(docs: list[dict]) -> dict[str, dict]:
    """Every Ray cluster spec the overlay makes: the RayCluster's and each RayJob's copy."""
    specs = {}
    for d in docs:
        if d["kind"] == "RayCluster":
            specs[f"RayCluster/{d['metadata']['name']}"] = d["spec"]
        elif d["kind"] == "RayJob":
            specs[f"RayJob/{d['metadata']['name']}"] = d["spec"]["rayClusterSpec"]
    return specs


def token_volumes(pod: dict) -> dict[str, dict]:
    """Volumes of the pod that carry a service-account token (projected serviceAccountToken)."""
    return {v["name"]: v for v in pod.get("volumes", [])
            if any("serviceAccountToken" in src for src in v.get("projected", {}).get("sources", []))}


def token_problems(cluster: dict) -> list[str]:
    """Why job code in this Ray cluster could hold a Kubernetes API token, or why the autoscaler
    could not."""
    problems = []
    head = cluster["headGroupSpec"]["template"]["spec"]
    if head.get("automountServiceAccountToken") is not False:
        problems.append("head: the kubelet mounts the service-account token into every container")
    tokens = token_volumes(head)
    for c in containers_of(head):
        for m in c.get("volumeMounts", []):
            if m["name"] in tokens or m["mountPath"].rstrip("/") == SA_TOKEN_DIR:
                problems.append(f"head/{c['name']}: mounts a Kubernetes token ({m['mountPath']})")
    mounts = cluster.get("autoscalerOptions", {}).get("volumeMounts", [])
    held = [m for m in mounts if m["name"] in tokens]
    if len(held) != 1 or held[0]["mountPath"] != SA_TOKEN_DIR or held[0].get("readOnly") is not True:
        problems.append(f"autoscaler: no read-only token at {SA_TOKEN_DIR} ({held})")
    else:
        files = {src.get("serviceAccountToken", {}).get("path") for src in
                 tokens[held[0]["name"]]["projected"]["sources"]}
        files |= {i["path"] for src in tokens[held[0]["name"]]["projected"]["sources"]
                  for i in (src.get("configMap") or src.get("downwardAPI") or {}).get("items", [])}
        if not {"token", "ca.crt", "namespace"} <= files:
            problems.append(f"autoscaler: the token volume lacks token, ca.crt or namespace: {files}")
    ray_mounts = {m["name"] for c in containers_of(head) for m in c.get("volumeMounts", [])}
    shared = sorted(ray_mounts & {m["name"] for m in mounts})
    if shared:   # job code could plant files there that the autoscaler reads or imports
        problems.append(f"autoscaler: shares volumes {shared} with the Ray container")
    for group in cluster.get("workerGroupSpecs", []):
        pod = group["template"]["spec"]
        if pod.get("automountServiceAccountToken") is not False or token_volumes(pod):
            problems.append(f"worker {group['groupName']}: holds a Kubernetes token")
    return problems


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_only_the_autoscaler_holds_a_kubernetes_token(overlay):
    """KubeRay's Role for the head's service account may patch every pod and RayCluster in the
    namespace; job code runs in the Ray containers, so only the autoscaler container mounts the
    token, and no other pod here mounts one at all."""
    docs = render(overlay)
    clusters = ray_cluster_specs(docs)
    assert len(clusters) == 2, clusters.keys()
    problems = [f"{name}: {p}" for name, spec in clusters.items() for p in token_problems(spec)]
    for name, pod in pod_specs(docs).items():
        if name.startswith(("RayCluster/", "RayJob/")):
            continue
        account = next((d for d in docs if d["kind"] == "ServiceAccount"
                        and d["metadata"]["name"] == pod.get("serviceAccountName")), {})
        if pod.get("automountServiceAccountToken", account.get("automountServiceAccountToken")) is not False:
            problems.append(f"{name}: mounts a service-account token")
    assert not problems, "\n".join(problems)


def test_token_check_finds_a_token_in_the_ray_container():
    cluster = copy.deepcopy(one(render(OVERLAYS[0]), "RayCluster")["spec"])
    assert not token_problems(cluster)
    head = cluster["headGroupSpec"]["template"]["spec"]
    head["containers"][0]["volumeMounts"].append({"name": "kube-api-access", "mountPath": "/k"})
    del head["automountServiceAccountToken"]
    problems = "\n".join(token_problems(cluster))
    assert "head/ray-head: mounts a Kubernetes token" in problems
    assert "the kubelet mounts the service-account token" in problems


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_drivers_run_off_the_head(overlay):
    """The head has no CPU for Ray to schedule and the RayJob's driver reserves one, so Ray places
    the driver, and with it the job's own code, on a worker."""
    docs = render(overlay)
    job = one(docs, "RayJob")
    assert job["spec"]["entrypointNumCpus"] >= 1
    for name, cluster in ray_cluster_specs(docs).items():
        assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0", name
        assert any(float(g["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"])
                   >= job["spec"]["entrypointNumCpus"] for g in cluster["workerGroupSpecs"]), name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_ray_cluster_gets_its_own_token(overlay):
    """No cluster names a token Secret, so KubeRay generates one per cluster (named after it): a
    RayJob's cluster does not get the long-lived cluster's token, nor it the RayJob's. No container
    takes RAY_AUTH_TOKEN from a Secret of its own choosing either."""
    docs = render(overlay)
    for name, cluster in ray_cluster_specs(docs).items():
        auth = cluster["authOptions"]
        assert auth["mode"] == "token", name
        assert not auth.get("secretName"), f"{name}: shares the token Secret {auth['secretName']!r}"
        for path, node in walk(cluster):
            for var in node.get("env", []) if isinstance(node.get("env"), list) else []:
                assert var["name"] != "RAY_AUTH_TOKEN", f"{name}{path}: sets RAY_AUTH_TOKEN itself"
