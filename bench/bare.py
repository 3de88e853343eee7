"""The bare-process variants of bench/overhead.py, each run in a fresh Python process:

  python bench/bare.py plain CONFIG_JSON   (a) a plain PyTorch loop and (a0) the same without a DataLoader
  python bench/bare.py fit CONFIG_JSON     (b) training.loop.fit
  python bench/bare.py ddp CONFIG_JSON     (e) fit on 2 processes forked after the imports, DDP/gloo, no Ray

CONFIG_JSON is a TrainConfig as a dict (1 worker; (e) makes it 2). The last line printed is JSON:
per-epoch samples/s, CPU seconds of the training thread(s), epoch periods, start-up (process start
to the first epoch), memory and threads. ``import_costs`` times module imports the same way.
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

from common import diffs, psutil_module
from processes import run_child, self_memory


def child(kind: str, cfg_dict: dict) -> dict:
    """(a)+(a0), (b) or (e) in this (fresh) process: per-epoch figures, start-up, memory."""
    import torch

    torch.set_num_threads(1)
    from training.config import TrainConfig

    cfg = TrainConfig.from_dict(cfg_dict)
    born = psutil_module().Process().create_time()
    if kind == "ddp":
        out = {"e": local_ddp(cfg_dict, born)}
    elif kind == "fit":
        from training.loop import fit

        ends: list[float] = []
        cpu: list[float] = []
        result = fit(cfg, lambda metrics, directory: (ends.append(time.time()), cpu.append(time.thread_time())))
        hist = result.history
        out = {"b": {"samples_per_s": [h["samples_per_s"] for h in hist],
                     "epoch_time_s": [h["epoch_time_s"] for h in hist],
                     "period_s": [b - a for a, b in zip(ends, ends[1:])], "cpu_s": diffs(cpu),
                     "startup_s": ends[0] - hist[0]["epoch_time_s"] - born}}
    else:
        out = {"a": plain_loop(cfg, born, dataloader=True), "a0": plain_loop(cfg, born, dataloader=False)}
        out["a0"]["startup_s"] = None   # it ran after (a) in the same process
    mem = self_memory()
    for v in out.values():
        v.setdefault("threads", torch.get_num_threads())
        v.setdefault("peak_rss_mb", mem["peak_rss_mb"])
        v.setdefault("pss_mb", mem["pss_mb"])
    return out


def _ddp_rank(rank: int, cfg_dict: dict, port: int, out_dir: str) -> None:
    """One of (e)'s processes: gloo process group over localhost, then fit()."""
    entry = time.time()
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    from training.config import TrainConfig
    from training.loop import fit

    world = cfg_dict["scaling"]["num_workers"]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    ends: list[float] = []
    cpu: list[float] = []
    hist = fit(TrainConfig.from_dict(cfg_dict),
               lambda metrics, directory: (ends.append(time.time()), cpu.append(time.thread_time()))).history
    dist.destroy_process_group()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps({
        "entry": entry, "ends": ends, "cpu_s": diffs(cpu), "samples_per_s": [h["samples_per_s"] for h in hist],
        "epoch_time_s": [h["epoch_time_s"] for h in hist], "peak_rss_mb": self_memory()["peak_rss_mb"],
        "pss_mb": self_memory()["pss_mb"]}))


def local_ddp(cfg_dict: dict, born: float) -> dict:
    """(e): the 2-worker config as 2 local processes running fit under DDP/gloo, no Ray: what a
    trial's worker group costs without Train's actors. The processes are forked (where the OS
    can) from a process that has imported what fit imports, as a trial process would have."""
    import torch.multiprocessing as tmp

    from tuning.driver.cluster import free_ports

    cfg_dict = {**cfg_dict, "scaling": {**cfg_dict["scaling"], "num_workers": 2,
                                        "batch_per_worker": cfg_dict["scaling"]["batch_per_worker"] // 2}}
    with tempfile.TemporaryDirectory(prefix="bench-ddp-") as out_dir:
        import sklearn.model_selection  # noqa: F401  (what fit imports, imported before the fork,
        import training.loop  # noqa: F401               as a trial process that forks its workers would)

        method = "fork" if "fork" in tmp.get_all_start_methods() else "spawn"
        spawned = time.time()
        tmp.start_processes(_ddp_rank, args=(cfg_dict, free_ports(1)[0], out_dir), nprocs=2, start_method=method)
        ranks = [json.loads(p.read_text()) for p in sorted(Path(out_dir).glob("rank*.json"))]
    first = max(r["ends"][0] - r["epoch_time_s"][0] for r in ranks)
    entry = max(r["entry"] for r in ranks)
    ends = ranks[0]["ends"]
    return {"samples_per_s": ranks[0]["samples_per_s"], "epoch_time_s": ranks[0]["epoch_time_s"],
            "period_s": [b - a for a, b in zip(ends, ends[1:])], "startup_s": first - born,
            "cpu_s": [sum(c) for c in zip(*(r["cpu_s"] for r in ranks))],
            "breakdown": {"process start -> fork (python, torch and training imports)": spawned - born,
                          "fork -> both ranks' entry": entry - spawned,
                          "entry -> first epoch (gloo, fit set-up)": first - entry},
            "peak_rss_mb": sum(r["peak_rss_mb"] for r in ranks) + self_memory()["peak_rss_mb"],
            "pss_mb": sum(r["pss_mb"] for r in ranks) + self_memory()["pss_mb"], "threads": 1}


def plain_loop(cfg, born: float, dataloader: bool) -> dict:
    """The reference: forward, loss, backward, SGD step; then a plain eval pass. Same model
    (the registry builds it), same data, same global batch, same optimizer settings."""
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader

    from training.data import load_data
    from training.models import build_model

    torch.manual_seed(cfg.seed)
    data = load_data(cfg.data)
    model = build_model(cfg.model, data.num_classes, data.input_shape)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.optim.base_lr, momentum=cfg.optim.momentum)
    batch = cfg.scaling.global_batch
    xs, ys = data.train.tensors

    def batches():
        if dataloader:
            yield from DataLoader(data.train, batch_size=batch, shuffle=True, drop_last=True)
            return
        perm = torch.randperm(len(ys))
        for i in range(len(ys) // batch):
            idx = perm[i * batch:(i + 1) * batch]
            yield xs[idx], ys[idx]

    sps, ends, cpu, first_start = [], [], [], None
    for _ in range(cfg.epochs):
        t0, c0 = time.perf_counter(), time.thread_time()
        first_start = first_start or time.time()
        model.train()
        n = 0
        for x, y in batches():
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()
            n += len(y)
        sps.append(n / (time.perf_counter() - t0))
        model.eval()
        with torch.no_grad():
            for x, y in DataLoader(data.val, batch_size=max(batch, 256)):
                (model(x).argmax(-1) == y).sum().item()
        ends.append(time.time())
        cpu.append(time.thread_time() - c0)
    return {"samples_per_s": sps, "period_s": [b - a for a, b in zip(ends, ends[1:])], "cpu_s": cpu[1:],
            "startup_s": first_start - born}


IMPORT_PROBE = ("import json, time; t = time.perf_counter(); import {mod}; s = time.perf_counter() - t; "
                "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM:')][0].split()[1]; "
                "print(json.dumps({{'s': s, 'rss_mb': int(hwm) / 1024}}))")


def import_costs() -> dict[str, dict]:
    """What importing each module costs a fresh Python process: seconds and peak RSS. Every Ray
    process of a trial that touches torch pays the torch line (the CUDA build maps its libraries
    even on a CPU-only machine)."""
    return {mod: run_child(["-c", IMPORT_PROBE.format(mod=mod)]) for mod in ("json", "ray", "torch", "ray.train.torch")}


if __name__ == "__main__":
    print(json.dumps(child(sys.argv[1], json.loads(sys.argv[2]))))
