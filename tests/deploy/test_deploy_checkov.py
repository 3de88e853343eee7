"""Deploy manifests through checkov (its own venv): only the listed failures, each with a reason, each still needed."""
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

from tests.deploy.test_deploy import DEPLOY, OVERLAYS, REPO, _render_text, ray_pod_specs, render


CHECKOV_TIMEOUT_S = 300


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
