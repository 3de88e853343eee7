"""Deploy manifests, security side: hardened containers, no secret values, Kubernetes API tokens,
Ray tokens, image pinning, NetworkPolicies (ingress and egress, evaluated as a CNI would), checkov."""
from __future__ import annotations

import copy
import functools
import ipaddress
import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import yaml

from tests.deploy.test_deploy import DEPLOY, OVERLAYS, REPO, _render_text, one, pod_specs, ray_pod_specs, render, walk

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


# --- images ------------------------------------------------------------------------------------------

IMAGE = re.compile(r"(?P<name>[^@:]+(?::\d+/[^@:]+)?)(?::(?P<tag>[\w][\w.-]*))?(?:@(?P<digest>sha256:[0-9a-f]{64}))?")
KIND_LOADED = {"cpu": {"schedtune"}}   # images `kind load docker-image` puts on the node


def containers_with_images(docs: list[dict]) -> list[tuple[str, str, str]]:
    """(where, image, pull policy) of every container, the autoscaler KubeRay adds included."""
    found = []
    for where, pod in pod_specs(docs).items():
        for c in containers_of(pod):
            found.append((f"{where}/{c['name']}", c["image"], c.get("imagePullPolicy", "")))
    for name, cluster in ray_cluster_specs(docs).items():
        opts = cluster.get("autoscalerOptions", {})
        head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
        # KubeRay's defaults for the autoscaler: the head's image, pull policy IfNotPresent.
        found.append((f"{name}/autoscaler", opts.get("image", head["image"]),
                      opts.get("imagePullPolicy", "IfNotPresent")))
    return found


def image_problems(overlay: str, docs: list[dict]) -> list[str]:
    problems = []
    for where, image, policy in containers_with_images(docs):
        m = IMAGE.fullmatch(image)
        if not m or not (m["tag"] or m["digest"]) or m["tag"] == "latest":
            problems.append(f"{where}: {image} is not pinned to a release tag or a digest")
        elif m["digest"]:
            continue   # immutable: any pull policy is correct
        elif m["name"] in KIND_LOADED.get(overlay, set()):
            if policy != "IfNotPresent":
                problems.append(f"{where}: {image} is loaded into kind, so IfNotPresent, not {policy!r}")
        elif policy != "Always":
            problems.append(f"{where}: {image} is a tag that can be pushed again: pull Always "
                            f"(or pin a digest), not {policy!r}")
    return problems


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_images_are_pinned_and_pulled_to_match(overlay):
    """Every image is a release tag or a digest; a tag (which its publisher can push again) is
    pulled Always, so that no node runs a stale copy under it; a digest may be cached. The only
    exception is the cpu overlay's schedtune image, which exists on the kind node alone."""
    problems = image_problems(overlay, render(overlay))
    assert not problems, "\n".join(problems)


def test_image_check_finds_mutable_tags():
    docs = render("gpu")
    mlflow = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]
    mlflow["containers"][0]["imagePullPolicy"] = "IfNotPresent"
    mlflow["initContainers"][0]["image"] = "ghcr.io/mlflow/mlflow:latest"
    cluster = one(docs, "RayCluster")["spec"]
    del cluster["autoscalerOptions"]["imagePullPolicy"]
    problems = "\n".join(image_problems("gpu", docs))
    assert "mlflow/mlflow: ghcr.io/mlflow/mlflow:v3.17.2-full is a tag" in problems
    assert "ghcr.io/mlflow/mlflow:latest is not pinned" in problems
    assert "RayCluster/schedtune/autoscaler" in problems
    digest = "sha256:" + "0" * 64
    mlflow["containers"][0]["image"] = f"ghcr.io/mlflow/mlflow@{digest}"
    assert "mlflow/mlflow: ghcr.io" not in "\n".join(image_problems("gpu", docs))


# --- network policies ----------------------------------------------------------------------------

METADATA = ipaddress.ip_address("169.254.169.254")
OWN_NAMESPACE = {"kubernetes.io/metadata.name": "schedtune"}


def network_policies(docs: list[dict]) -> list[dict]:
    policies = [d["spec"] for d in docs if d["kind"] == "NetworkPolicy"]
    for spec in policies:   # the evaluator below reads matchLabels only
        for _, node in walk(spec):
            assert "matchExpressions" not in node, "extend selects() for matchExpressions"
    return policies


def selects(selector: dict, labels: dict) -> bool:
    return selector.get("matchLabels", {}).items() <= labels.items()


def peer_admits(peer: dict, namespace: dict, pod: dict | None, address=None) -> bool:
    """Whether a NetworkPolicy peer admits a pod (its namespace's labels, its labels) or, for
    pod=None, an address outside the cluster's pods."""
    if "ipBlock" in peer:
        if address is None:
            return False   # pod IPs are not what these ipBlocks are for; treated as no match
        block = peer["ipBlock"]
        return (address in ipaddress.ip_network(block["cidr"])
                and not any(address in ipaddress.ip_network(e) for e in block.get("except", [])))
    if pod is None:
        return False
    if "namespaceSelector" in peer:
        if not selects(peer["namespaceSelector"], namespace):
            return False
    elif namespace != OWN_NAMESPACE:
        return False
    return selects(peer.get("podSelector", {}), pod)


def port_admits(rule: dict, port: int, protocol: str) -> bool:
    return "ports" not in rule or any(p.get("port") == port and p.get("protocol", "TCP") == protocol
                                      for p in rule["ports"])


def admits(policies: list[dict], direction: str, pod: dict, peer_namespace: dict, peer: dict | None,
           port: int, protocol: str = "TCP", address=None) -> bool:
    """Whether the policies selecting `pod` (in this namespace) admit traffic in `direction`
    ("Ingress" from, "Egress" to) the peer on the port, as the NetworkPolicy API defines it."""
    key = "from" if direction == "Ingress" else "to"
    applicable = [p for p in policies if selects(p["podSelector"], pod) and direction in p["policyTypes"]]
    if not applicable:
        return True   # a pod no policy isolates
    return any(port_admits(rule, port, protocol)
               and ("to" not in rule and "from" not in rule
                    or any(peer_admits(x, peer_namespace, peer, address) for x in rule[key]))
               for p in applicable for rule in p.get(direction.lower(), []))


def can_connect(policies, src: dict, dst_namespace: dict, dst: dict | None, port: int,
                protocol: str = "TCP", address=None) -> bool:
    """src (a pod here) to dst (a pod in dst_namespace, or an address outside the pods)."""
    out = admits(policies, "Egress", src, dst_namespace, dst, port, protocol, address)
    if dst is None or dst_namespace != OWN_NAMESPACE:
        return out   # other namespaces' and outside ingress rules are not ours to check
    return out and admits(policies, "Ingress", dst, OWN_NAMESPACE, src, port, protocol)


def pod_labels(docs: list[dict]) -> dict[str, dict]:
    """Labels of the pods the overlay makes, including those KubeRay adds to Ray pods."""
    labels = {}
    for d in docs:
        if d["kind"] in ("Deployment", "StatefulSet"):
            labels[d["metadata"]["name"]] = d["spec"]["template"]["metadata"]["labels"]
        elif d["kind"] == "CronJob":
            labels[d["metadata"]["name"]] = d["spec"]["jobTemplate"]["spec"]["template"]["metadata"]["labels"]
        elif d["kind"] == "RayCluster":
            head = d["spec"]["headGroupSpec"]["template"]["metadata"]["labels"]
            labels["ray-head"] = {**head, "ray.io/node-type": "head"}
            for g in d["spec"]["workerGroupSpecs"]:
                labels[f"ray-worker-{g['groupName']}"] = {
                    **g["template"]["metadata"]["labels"], "ray.io/node-type": "worker"}
    return labels


def metadata_leaks(policies: list[dict]) -> list[str]:
    """Egress rules that admit the instance metadata address, or any destination at all."""
    leaks = []
    for spec in policies:
        if "Egress" not in spec["policyTypes"]:
            continue
        for rule in spec.get("egress", []):
            if "to" not in rule:
                leaks.append(f"{spec['podSelector']}: an egress rule with no `to` admits every address")
            for peer in rule.get("to", []):
                if peer_admits(peer, {}, None, METADATA):
                    leaks.append(f"{spec['podSelector']}: {peer['ipBlock']} admits {METADATA}")
    return leaks


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_egress_is_denied_by_default_and_never_reaches_the_metadata_service(overlay):
    """Every pod is isolated for egress, and no rule admits 169.254.169.254: job code cannot take
    the node's cloud role from the instance metadata service."""
    policies = network_policies(render(overlay))
    deny = [p for p in policies if p["podSelector"] == {} and not p.get("egress") and not p.get("ingress")]
    assert deny and {"Ingress", "Egress"} <= set(deny[0]["policyTypes"]), "no default deny of both"
    assert not metadata_leaks(policies), "\n".join(metadata_leaks(policies))


def test_metadata_check_finds_an_open_egress_rule():
    policies = network_policies(render("gpu"))
    assert not metadata_leaks(policies)
    open_egress = {"podSelector": {}, "policyTypes": ["Egress"],
                   "egress": [{"to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": ["10.0.0.0/8"]}}]}, {}]}
    leaks = "\n".join(metadata_leaks(policies + [open_egress]))
    assert "admits 169.254.169.254" in leaks and "no `to` admits every address" in leaks


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies(overlay):
    """Who can talk to whom, evaluated from the rendered policies as a CNI would: what each pod
    needs is admitted, and the paths an attacker with job code would want are not."""
    docs = render(overlay)
    policies = network_policies(docs)
    pods = pod_labels(docs)
    head, worker, mlflow, postgres, backup = (pods["ray-head"], pods["ray-worker-cpu"], pods["mlflow"],
                                              pods["postgres"], pods["postgres-backup"])
    own = OWN_NAMESPACE
    dns_ns, dns = {"kubernetes.io/metadata.name": "kube-system"}, {"k8s-app": "kube-dns"}
    api_server = ipaddress.ip_address("172.18.0.2")   # kind's control-plane node (port 6443)
    internet = ipaddress.ip_address("52.216.0.1")     # an S3 address
    expected = {
        # what must work
        "worker -> head GCS": (can_connect(policies, worker, own, head, 6379), True),
        "head -> worker raylet": (can_connect(policies, head, own, worker, 40000), True),
        "worker -> MLflow": (can_connect(policies, worker, own, mlflow, 5000), True),
        "MLflow -> PostgreSQL": (can_connect(policies, mlflow, own, postgres, 5432), True),
        "backup -> PostgreSQL": (can_connect(policies, backup, own, postgres, 5432), True),
        "head -> DNS": (can_connect(policies, head, dns_ns, dns, 53, "UDP"), True),
        "PostgreSQL -> DNS": (can_connect(policies, postgres, dns_ns, dns, 53, "UDP"), True),
        "head -> API server": (can_connect(policies, head, {}, None, 6443, address=api_server), True),
        "operator -> head job API": (admits(policies, "Ingress", head,
                                            {"kubernetes.io/metadata.name": "kuberay-system"}, {}, 8265), True),
        "submitter namespace -> head job API": (admits(policies, "Ingress", head,
                                                       {"schedtune.io/submitter": "true"}, {}, 8265), True),
        "Prometheus -> worker metrics": (admits(policies, "Ingress", worker,
                                                {"schedtune.io/metrics-scraper": "true"}, {}, 8080), True),
        "worker -> package proxy": (can_connect(policies, worker, {"schedtune.io/egress-proxy": "true"},
                                                {"app": "squid"}, 3128), True),
        "MLflow -> object store": (can_connect(policies, mlflow, {}, None, 443, address=internet),
                                   overlay != "cpu"),
        # what job code must not reach
        "worker -> PostgreSQL": (can_connect(policies, worker, own, postgres, 5432), False),
        "worker -> API server": (can_connect(policies, worker, {}, None, 6443, address=api_server), False),
        "worker -> internet": (can_connect(policies, worker, {}, None, 443, address=internet), False),
        "head -> internet": (can_connect(policies, head, {}, None, 443, address=internet), False),
        "worker -> metadata": (can_connect(policies, worker, {}, None, 80, address=METADATA), False),
        "head -> metadata": (can_connect(policies, head, {}, None, 80, address=METADATA), False),
        "MLflow -> metadata": (can_connect(policies, mlflow, {}, None, 80, address=METADATA), False),
        "worker -> head job API from another namespace": (
            admits(policies, "Ingress", head, {"kubernetes.io/metadata.name": "other"}, {}, 8265), False),
        "other namespace -> MLflow": (admits(policies, "Ingress", mlflow,
                                             {"kubernetes.io/metadata.name": "other"}, {}, 5000), False),
        "MLflow -> Ray pods": (can_connect(policies, mlflow, own, worker, 8265), False),
        "backup -> MLflow": (can_connect(policies, backup, own, mlflow, 5000), False),
        "any pod -> other pods' DNS port": (can_connect(policies, worker, own, mlflow, 53, "UDP"), False),
    }
    wrong = [f"{path}: {'admitted' if got else 'denied'}, expected {'admitted' if want else 'denied'}"
             for path, (got, want) in expected.items() if got != want]
    assert not wrong, "\n".join(wrong)
    # The job API's peers are exactly the submitter namespaces and the operator's.
    dashboard = [r for p in policies if p["podSelector"].get("matchLabels", {}).get("ray.io/node-type") == "head"
                 for r in p.get("ingress", [])]
    assert dashboard and all([pt["port"] for pt in r["ports"]] == [8265] for r in dashboard)
    for r in dashboard:
        for peer in r["from"]:
            assert set(peer) == {"namespaceSelector"}, peer


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
                    "imagePullPolicy": opts.get("imagePullPolicy", "IfNotPresent"),
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
