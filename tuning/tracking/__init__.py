"""MLflow: the only package that imports it. Importing this face loads nothing heavy; import the member.

- ``schema``: every tag, param and artifact name schedtune writes
- ``backend``: which tracking URI, whether it can be used (before Ray starts), the experiment in it
- ``callback``: ``MLflowTracker``, the Tune callback that logs an experiment from the driver
- ``reads``: experiments read back (``schedtune runs``, ``report``, ``ensemble``, ``export``); never creates a store
- ``registry``: a trial's model rebuilt from its checkpoint and registered (ONNX, servable without
  schedtune, alias ``champion``); exports logged to their run; pretrained weights fetched back
- ``uploads``: artifact uploads with their own timeout and retries; what still fails is counted
- ``run_files``: what the tracker writes into its runs (checkpoints, plots, end tags)
- ``trial_files``: a trial's checkpoint directories on the results storage (best and last)
- ``entities``: MLflow's Param/RunTag/Metric as schedtune logs them
- ``recipe_log``, ``ensemble_log``: the runs of ``schedtune recipe`` and ``schedtune ensemble``

A second tracking backend would implement what ``callback.MLflowTracker`` does (a Tune callback with
``run_id``/``unsent_metrics``/``finish``) and what ``reads`` answers; see docs/layout.md, "How to add".
"""
