"""Browser test: the MLflow UI shows an experiment's trial runs nested under its parent run.

Headless Chromium (Debian's ``chromium`` package; ``.ci/run`` installs it) driven by Playwright
for Python opens the page schedtune's summary links to (tuning.analysis.report.runs_page) on the
session's real ``mlflow server`` after the 4-trial ASHA experiment of ``conftest.experiment``, in a
fresh browser profile, and checks what a person would see there without switching any view.

MLflow 3.17 UI notes (what the test relies on):
  * The experiment carries ``mlflow.experimentKind = custom_model_development`` (schedtune sets it),
    but 3.17's UI does not route by it: ``#/experiments/<id>`` (what MLflow prints, and where the
    experiment list links) redirects to the GenAI "Overview" page (``overview/usage?workflowType=genai``)
    for every experiment, because the view is a global "GenAI | Model training" toggle kept in the
    browser's localStorage (``mlflow.workflowType``, GenAI when empty) and the experiment kind is
    read from that toggle (a feature flag hard-wired on in 3.17.2's bundle). The runs table lives
    at ``#/experiments/<id>/runs``; ``?workflowType=machine_learning`` opens it in the "Model
    training" side bar: that is the link schedtune prints.
  * The runs table is an AG Grid with ARIA roles: ``role=row`` rows carrying ``aria-rowindex``
    (their order in the grid), ``role=gridcell`` cells; the run name is a link to
    ``#/experiments/<id>/runs/<run_id>``. The grid is flat (every row has
    ``ag-row-level-0``): MLflow draws the nesting itself. A parent row's name cell has an
    icon-only expander button (a "+" box, no aria-label); children are collapsed by default,
    i.e. not rendered at all, and appear right after the parent when it is expanded, with their
    name cell indented (a wider spacer in place of the expander) and no expander of their own.
"""
from __future__ import annotations

import shutil

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(900)]

# Skipped at import time, so a machine without a browser does not run the 2-minute experiment.
sync_api = pytest.importorskip("playwright.sync_api", reason="the `playwright` pip package is not installed")
CHROMIUM = shutil.which("chromium") or shutil.which("/usr/bin/chromium")
if CHROMIUM is None:
    pytest.skip("no `chromium` executable (Debian package `chromium`; .ci/run installs it)",
                allow_module_level=True)

CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
LOAD_TIMEOUT_MS = 45_000     # first load of the UI bundle on a busy 2-core CI machine
STEP_TIMEOUT_MS = 15_000


def _row_of(page, link):
    """The grid row (``role=row``) holding a run-name link (the pinned Run Name column's row)."""
    return page.get_by_role("row").filter(has=link)


def _run_link(page, run_id: str):
    return page.locator(f'a[href$="/runs/{run_id}"]')


def assert_trials_nested_in_ui(page, uri: str, experiment_id: str, parent_run_id: str,
                               trials: dict[str, str], screenshot_dir) -> None:
    """Open the page schedtune links to and check that it is the experiment's training runs (no view
    switched: a fresh profile, no click on the GenAI / Model training toggle) and that the trials
    ({trial_id: run_id}) are shown as children of the parent run:

    1. collapsed (the default): the parent row is there, with an expander, and none of the trial
       runs is rendered anywhere on the page, although they belong to the same experiment;
    2. after clicking the parent's expander: every trial appears, as a link with exactly its
       trial id as text pointing at its own MLflow run, in a row that comes right after the
       parent's row (the trial rows form the contiguous block of ``aria-rowindex`` values after
       the parent's, so no other run sits between parent and children), whose name is indented
       further right than the parent's, and which has no expander of its own;
    3. clicking the expander again hides every trial run again.

    Together: the trials are shown only through, and directly below, that one parent run, indented
    one level, which is how the UI displays ``mlflow.parentRunId`` nesting (a run that were not
    a child of this parent would be listed at top level whether the parent is expanded or not).
    """
    from tuning.analysis.report import runs_page

    expect = sync_api.expect
    page.goto(runs_page(uri, experiment_id))
    try:
        # the training view: its "Runs" page, not the GenAI overview (whose side bar has "Sessions")
        expect(page.get_by_role("heading", name="Runs", exact=True)).to_be_visible(timeout=LOAD_TIMEOUT_MS)
        assert f"#/experiments/{experiment_id}/runs" in page.url and "overview" not in page.url
        expect(page.get_by_text("Sessions", exact=True)).to_have_count(0)
        parent_link = _run_link(page, parent_run_id)
        expect(parent_link).to_be_visible(timeout=LOAD_TIMEOUT_MS)
        assert parent_link.inner_text().startswith("it-asha-")
        parent_row = _row_of(page, parent_link)
        expect(parent_row).to_have_count(1)
        # the Run Name cell holds the colour pill, the link and (for parents) the expander button
        expander = page.get_by_role("gridcell").filter(has=parent_link).get_by_role("button")
        expect(expander).to_have_count(1)

        # 1. collapsed: no trial run rendered
        for trial_id, run_id in trials.items():
            expect(_run_link(page, run_id)).to_have_count(0, timeout=STEP_TIMEOUT_MS)
            expect(page.get_by_role("link", name=trial_id, exact=True)).to_have_count(0)
        page.screenshot(path=str(screenshot_dir / "runs-collapsed.png"))

        # 2. expanded: each trial in the rows right after the parent, indented, without an expander
        expander.click()
        child_rows = {}
        for trial_id, run_id in trials.items():
            link = page.get_by_role("link", name=trial_id, exact=True)
            expect(link).to_be_visible(timeout=STEP_TIMEOUT_MS)
            assert link.get_attribute("href").endswith(f"/runs/{run_id}"), (trial_id, run_id)
            row = _row_of(page, link)
            expect(row).to_have_count(1)
            expect(page.get_by_role("gridcell").filter(has=link).get_by_role("button")).to_have_count(0)
            child_rows[trial_id] = (int(row.get_attribute("aria-rowindex")), link.bounding_box()["x"])
        page.screenshot(path=str(screenshot_dir / "runs-expanded.png"))

        parent_index = int(parent_row.get_attribute("aria-rowindex"))
        parent_x = parent_link.bounding_box()["x"]
        indices = sorted(index for index, _ in child_rows.values())
        assert indices == list(range(parent_index + 1, parent_index + 1 + len(trials))), (parent_index, child_rows)
        xs = {x for _, x in child_rows.values()}
        assert len(xs) == 1 and xs.pop() > parent_x, (parent_x, child_rows)   # one level, right of the parent

        # 3. collapsed again: the trials go away with the parent's expander
        expander.click()
        for trial_id in trials:
            expect(page.get_by_role("link", name=trial_id, exact=True)).to_have_count(0, timeout=STEP_TIMEOUT_MS)
        expect(parent_link).to_be_visible()
    except Exception:
        page.screenshot(path=str(screenshot_dir / "runs-failure.png"), full_page=True)
        raise


def test_trial_runs_are_nested_under_the_parent_run_in_the_ui(experiment, mlflow_server, tmp_path):
    import mlflow

    from tuning.analysis.report import runs_page, summary

    spec, result, _ = experiment
    trials = {row.trial_id: row.run_id for row in result.rows}
    assert len(trials) == len(result.rows) and all(trials.values()), trials
    assert result.experiment_id and result.parent_run_id
    exp = mlflow.MlflowClient(mlflow_server.uri).get_experiment(result.experiment_id)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    assert f"the trials in the UI: {runs_page(mlflow_server.uri, result.experiment_id)}" in summary(result, spec)

    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            page.set_default_timeout(STEP_TIMEOUT_MS)
            assert_trials_nested_in_ui(page, mlflow_server.uri, result.experiment_id, result.parent_run_id,
                                       trials, tmp_path)
        finally:
            browser.close()
