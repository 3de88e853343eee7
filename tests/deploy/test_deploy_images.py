"""Deploy manifests: every image pinned (a tag or a digest) and pulled to match."""
from __future__ import annotations

import re

import pytest

from tests.deploy.test_deploy import OVERLAYS, one, pod_specs, render

from tests.deploy.test_deploy_security import containers_of
from tests.deploy.test_deploy_tokens import ray_cluster_specs


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
