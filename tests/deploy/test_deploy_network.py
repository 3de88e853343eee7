"""Deploy manifests: NetworkPolicies, ingress and egress, evaluated as a CNI would (default deny, no path to the metadata service)."""
from __future__ import annotations

import ipaddress

import pytest

from tests.deploy.test_deploy import OVERLAYS, render, walk



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
