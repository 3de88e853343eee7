"""The MLflow UI, in headless Chromium, shows each trial's run nested under its experiment run."""
from __future__ import annotations

import shutil

import pytest

from tests.conftest import NUM_SAMPLES

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(900)]

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# The flags a sandboxed machine without a network needs (no sandbox as root, no background calls).
ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (.ci/run installs it)")
def test_trial_runs_are_nested_under_the_experiment_run(experiment, mlflow_server, tmp_path):
    """Nesting, as a person sees it: on the experiment's runs page the trials are hidden until the
    parent run's expander is clicked; then every trial's run appears in the rows right after the
    parent's, indented under it."""
    import mlflow

    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
    spec, result, _ = experiment
    parent = mlflow.MlflowClient(mlflow_server.uri).get_run(result.parent_run_id)
    trials = [r.trial_id for r in result.rows]
    assert len(trials) == NUM_SAMPLES

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            page.goto(f"{mlflow_server.uri}/#/experiments/{parent.info.experiment_id}/runs", timeout=60_000)
            parent_link = page.get_by_role("link", name=parent.info.run_name, exact=True)
            parent_link.wait_for(timeout=60_000)
            assert all(page.get_by_role("link", name=t, exact=True).count() == 0 for t in trials)

            parent_cell = page.locator("[role=gridcell]", has=parent_link).first
            parent_cell.locator("button").first.click()      # the expander in the run-name cell
            for t in trials:
                page.get_by_role("link", name=t, exact=True).wait_for(timeout=30_000)
            page.screenshot(path=str(tmp_path / "runs.png"))

            def row_index(name: str) -> int:
                link = page.get_by_role("link", name=name, exact=True)
                return int(page.locator("[role=row]", has=link).first.get_attribute("row-index"))

            top = row_index(parent.info.run_name)
            assert sorted(row_index(t) for t in trials) == list(range(top + 1, top + 1 + NUM_SAMPLES))
            indent = page.get_by_role("link", name=parent.info.run_name, exact=True).bounding_box()["x"]
            assert all(page.get_by_role("link", name=t, exact=True).bounding_box()["x"] > indent for t in trials)
        finally:
            browser.close()
