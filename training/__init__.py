"""Pure-PyTorch training core: config, schedules, regularizers, models, data, the per-worker loop. No Ray here."""
