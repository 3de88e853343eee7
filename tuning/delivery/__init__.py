"""After training: a trial's model as something to use (the commands are in tuning.cli).

- ``trial_ensemble``: the top-K trials of an experiment as one model (``schedtune ensemble``)
- ``export``: a trial's model as TorchScript or ONNX, checked against PyTorch (``schedtune export``)
"""
