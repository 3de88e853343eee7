"""Is the accelerator fed? Images/s of schedtune's ``fit`` against a bare PyTorch loop, and its data wait.

  (1) ResNet-50 at 224 px and a CIFAR-size ResNet-18 (32 px, small stem) on synthetic uint8 images in
      memory, under fp32, bf16, bf16 + channels_last, bf16 + channels_last + torch.compile:
      - model only: one batch resident on the device, forward/backward/SGD step (the ceiling);
      - bare loop: what a careful hand-written loop does with the same host images: gather the batch,
        pin it, copy it non_blocking as uint8, standardize on the device, step; no host sync per step;
      - fit: ``training.loop.fit`` on the same images (the uint8 in-memory dataset path), its own
        ``samples_per_s`` and ``data_wait_fraction`` of its last epoch (the first compiles and warms up).
  (2) fit reading a generated folder of JPEGs (``data.name: imagefolder``, 224 px: decode, resize,
      crop per sample) with ResNet-50, bf16 + channels_last, at several ``data.loader_workers``: its
      data-wait fraction on the last epoch (persistent loader workers: no start-up in it); and the
      same folder read by Ray Data (``data.name: raydata``), decoded by the tasks of a local cluster.
  (3) DDP: fit on every GPU of the machine (one process each, NCCL) where there are several; the
      smoke run does it with 2 CPU processes over gloo, to run the code.
  The anchors: published figures for comparison (as quoted in issue 14).

Goals (reported met or not): fit >= 0.95 of the bare loop in every setting; bf16 >= 2x fp32 (fit,
on a GPU); data wait <= 5% at 224 px with enough loader workers or Ray Data. ``fp32`` is PyTorch's default, in
which convolutions run in TF32 on Ampere and later (``torch.backends.cudnn.allow_tf32``), as in
NVIDIA's TF32 figure. cuDNN autotuning (``cudnn.benchmark``) is off in every variant, as in fit.

  python bench/gpu.py            one GPU machine, one call: under 8 minutes (no part starts past 6.5, said so)
  python bench/gpu.py --quick    ResNet-50 only, no compile, fewer steps
  python bench/gpu.py --smoke    CPU, seconds, meaningless figures (tests/bench/test_bench.py)
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path
from typing import Any, Optional

from common import Report, fmt, parse_args, pick

NAME = "gpu"
BUDGET_S = 390   # no part starts past 6.5 min: the longest (a compile) takes ~1 min
GOAL_RATIO, GOAL_BF16, GOAL_WAIT = 0.95, 2.0, 0.05
SETTINGS = {   # label -> (train.precision, train.channels_last, train.compile)
    "fp32": ("fp32", False, "off"), "bf16": ("bf16", False, "off"), "bf16_cl": ("bf16", True, "off"),
    "bf16_cl_compile": ("bf16", True, "default")}
SHORT = {"resnet50": "rn50", "resnet18": "rn18"}   # RESULT keys
ANCHORS = [
    ("NVIDIA DeepLearningExamples, PyTorch ResNet-50 v1.5, 1x A100 80GB, AMP", "2,470 img/s"),
    ("the same, TF32", "938 img/s (AMP is 2.6x)"),
    ("channels_last on ResNet-50 (with AMP)", "+22-30%"),
    ("torch.compile in torchtitan", "+16%"),
]


def synthetic_images(num_samples: int, image_size: int, classes: int = 1000, val_batches: int = 1, batch: int = 256):
    """A ``data.name: gpu:synthetic_images`` plug-in: ``num_samples`` random uint8 images (the
    training split) and ``val_batches`` x ``batch`` more (validation), standardized on the device."""
    import torch

    from training.bundle import DataBundle, Uint8Images

    g = torch.Generator().manual_seed(0)
    n = num_samples + val_batches * batch
    x = torch.randint(0, 256, (n, 3, image_size, image_size), dtype=torch.uint8, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    mean, std = torch.full((3, 1, 1), 127.5), torch.full((3, 1, 1), 73.9)
    return DataBundle(Uint8Images(x[:num_samples], y[:num_samples], mean, std), Uint8Images(x[num_samples:],
                      y[num_samples:], mean, std), num_classes=classes, input_shape=(3, image_size, image_size),
                      class_names=[str(c) for c in range(classes)], is_image=True, mean=mean, std=std)


def fit_config(model: str, size: int, classes: int, batch: int, steps: int, setting: str, gpu: bool,
               epochs: int = 2, data: Optional[dict] = None) -> dict[str, Any]:
    precision, channels_last, compile_mode = SETTINGS[setting]
    data = data or {"name": "gpu:synthetic_images", "num_samples": batch * steps, "image_size": size,
                    "args": {"classes": classes, "batch": batch}}
    return {"epochs": epochs, "seed": 0, "precision": precision, "channels_last": channels_last,
            "compile": compile_mode, "data": data, "model": {"name": model, "small_stem": size <= 64},
            "optim": {"name": "sgd", "base_lr": 0.01, "momentum": 0.9, "weight_decay": 5e-5},
            "schedule": {"name": "constant", "warmup": "none"},
            "scaling": {"num_workers": 1, "batch_per_worker": batch, "use_gpu": gpu}}


def run_fit(cfg_dict: dict, device=None, data=None) -> dict[str, float]:
    """fit's figures of its last epoch (``data``: a DataBundle it trains on instead of cfg.data's)."""
    from training.config import TrainConfig
    from training.loop import fit

    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as work:
        last = fit(TrainConfig.from_dict(cfg_dict), workdir=work, device=device, data=data).history[-1]
    return {k: last[k] for k in ("samples_per_s", "samples_per_s_total", "data_wait_fraction", "peak_memory_mb")}


def bare_loop(cfg_dict: dict, setting: str, device, warmup: int, steps: int, resident: bool) -> float:
    """Images/s of the hand-written loop (see the module docstring) on fit's model and images;
    ``resident``: one batch kept on the device instead (the model-only ceiling)."""
    import torch
    import torch.nn.functional as F

    from training.config import TrainConfig
    from training.data import load_data
    from training.models import build_model

    cfg = TrainConfig.from_dict(cfg_dict)
    precision, channels_last, compile_mode = SETTINGS[setting]
    data = load_data(cfg.data)      # the same tensors fit gets (load_data caches by config)
    torch.manual_seed(0)
    model = build_model(cfg.model, data.num_classes, data.input_shape).to(device)
    fmt_ = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt_)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-5)
    step_model = torch.compile(model) if compile_mode != "off" else model
    ds, b = data.train, cfg.scaling.batch_per_worker
    mean, std = ds.mean.to(device), ds.std.to(device)
    gpu = device.type == "cuda"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))

    def batch(i: int):
        idx = order[(i * b) % (len(ds) - b + 1):][:b]
        x, y = ds.images[idx], ds.labels[idx]
        if gpu:
            x, y = x.pin_memory(), y.pin_memory()
        x, y = x.to(device, non_blocking=gpu), y.to(device, non_blocking=gpu)
        return ((x.float() - mean) / std).contiguous(memory_format=fmt_), y

    fixed = batch(0)

    def step(i: int) -> None:
        x, y = fixed if resident else batch(i)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = F.cross_entropy(step_model(x).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for i in range(warmup):
        step(i)
    if gpu:
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for i in range(steps):
        step(warmup + i)
    if gpu:
        torch.cuda.synchronize(device)
    return steps * b / (time.perf_counter() - t0)


def _jpeg(args: tuple[str, int, int]) -> int:
    """One JPEG of smooth color blobs and noise (~ photo-like compressibility); its size in bytes."""
    import numpy as np
    from PIL import Image

    path, side, seed = args
    rng = np.random.default_rng(seed)
    low = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    img = Image.fromarray(low).resize((side, side), Image.BICUBIC)
    noisy = np.clip(np.asarray(img, dtype=np.int16) + rng.integers(-12, 13, (side, side, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(noisy).save(path, quality=90)
    return os.path.getsize(path)


def image_folder(root: Path, per_class: int, classes: int, side: int) -> float:
    """root/train/<class>/*.jpg and root/val/<class>/*.jpg (a tenth as many); mean file size in KB."""
    jobs = []
    for split, n in (("train", per_class), ("val", max(1, per_class // 10))):
        for c in range(classes):
            (root / split / f"c{c}").mkdir(parents=True, exist_ok=True)
            jobs += [(str(root / split / f"c{c}" / f"{i}.jpg"), side, len(jobs) + i) for i in range(n)]
    with Pool(min(len(jobs), os.cpu_count() or 1)) as pool:
        sizes = pool.map(_jpeg, jobs, chunksize=16)
    return sum(sizes) / len(sizes) / 1024


def ray_data_fit(cfg_dict: dict, cpus: int, device) -> dict[str, float]:
    """fit on the JPEG folder read by Ray Data (``data.name: raydata``, format images: decoded by
    Ray Data's tasks on a private local cluster of ``cpus`` CPUs), as a 1-worker trial reads it."""
    from processes import ray_cluster
    from training.config import TrainConfig
    from tuning.driver import ingest

    with ray_cluster(cpus):
        cfg = TrainConfig.from_dict(cfg_dict)
        streamed = ingest.build(cfg)
        data = ingest.worker_data(cfg, streamed.facts, streamed.datasets["train"], streamed.datasets["val"], 0, device)
        return run_fit(cfg_dict, device, data)


def _ddp_rank(rank: int, world: int, cfg_dict: dict, port: int, out_dir: str, backend: str) -> None:
    import torch
    import torch.distributed as dist

    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    figures = run_fit(cfg_dict, device)
    dist.destroy_process_group()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(figures))


def ddp(cfg_dict: dict, world: int, backend: str) -> dict[str, float]:
    """fit on ``world`` local processes (spawned: CUDA does not survive a fork); rank 0's figures."""
    import torch.multiprocessing as tmp

    from tuning.driver.cluster import free_ports

    cfg_dict = {**cfg_dict, "scaling": {**cfg_dict["scaling"], "num_workers": world}}   # steps of a 1/world shard

    with tempfile.TemporaryDirectory(prefix="bench-gpu-ddp-") as out_dir:
        tmp.start_processes(_ddp_rank, args=(world, cfg_dict, free_ports(1)[0], out_dir, backend), nprocs=world,
                            start_method="spawn")
        return json.loads(Path(out_dir, "rank0.json").read_text())


def configure(p) -> None:
    p.add_argument("--ray-data", action=argparse.BooleanOptionalAction, default=None,
                   help="also read the JPEG folder with Ray Data (default: on, off with --smoke)")


class Budget:
    """Skips what would run past BUDGET_S (the full run must finish within 8 minutes in one call)."""

    def __init__(self, limit_s: float):
        self.t0, self.limit_s, self.skipped = time.monotonic(), limit_s, []

    def allows(self, what: str) -> bool:
        if time.monotonic() - self.t0 < self.limit_s:
            return True
        self.skipped.append(what)
        return False


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], configure)
    if args.ray_data is None:
        args.ray_data = args.mode != "smoke"   # it starts a Ray cluster: tens of seconds
    import torch

    gpu = torch.cuda.is_available()
    if not gpu and args.mode != "smoke":
        raise SystemExit("bench/gpu.py needs a CUDA GPU outside --smoke (found none): python bench/gpu.py --smoke "
                         "runs it on the CPU, figures meaningless")
    device = torch.device("cuda", 0) if gpu else torch.device("cpu")
    rep = Report(NAME, args, "GPU throughput: fit against a bare loop, precision and kernels, data wait")
    if not gpu:
        rep.note("**CPU smoke run: these figures say nothing about the GPU goals** (a small CNN on tiny images, "
                 "no compile); they only show that the script runs.")
    budget = Budget(pick(args, BUDGET_S, BUDGET_S, 600))
    # (2)'s JPEGs first: made by forked processes, before this one holds a CUDA context
    side, per_class, n_classes = pick(args, (320, 300, 10), (320, 150, 10), (48, 6, 2))
    jpeg_size, jpeg_batch, jpeg_model = pick(args, 224, 224, 32), pick(args, 128, 128, 4), pick(args, *["resnet50"] * 2,
                                                                                              "small_cnn")
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    worker_counts = pick(args, sorted({2, 4, 8, max(cpus - 1, 1)}), sorted({4, max(cpus - 1, 1)}), [0, 2])
    work = tempfile.TemporaryDirectory(prefix="bench-gpu-jpeg-")
    jpegs = Path(work.name)
    kb = image_folder(jpegs, per_class, n_classes, side)
    # smoke: a small CNN (a ResNet's tens of millions of weights take seconds a step on a busy CPU)
    models = pick(args, [("resnet50", 224, 1000, 256, 24), ("resnet18", 32, 10, 512, 48)],
                  [("resnet50", 224, 1000, 256, 12)], [("small_cnn", 16, 10, 8, 2)])
    # compile: the full GPU run only (compiling a ResNet takes minutes on a CPU, ~1 min on a GPU machine)
    settings = [s for s in SETTINGS if "compile" not in s or (gpu and args.mode == "full")]
    values: dict[str, Any] = {"device": "cuda" if gpu else "cpu", "gpus": torch.cuda.device_count()}
    rows, ratios, fits = [], [], {}
    for model, size, classes, batch, steps in models:
        for s in settings:
            key = f"{SHORT.get(model, model)}_{s}"
            if not budget.allows(key):
                continue
            cfg = fit_config(model, size, classes, batch, steps, s, gpu)
            ceiling = bare_loop(cfg, s, device, warmup=pick(args, 8, 4, 1), steps=steps, resident=True)
            bare = bare_loop(cfg, s, device, warmup=pick(args, 8, 4, 1), steps=steps, resident=False)
            f = run_fit(cfg)
            fits[key] = f["samples_per_s"]
            ratios.append(f["samples_per_s"] / bare)
            rows.append([f"{model} {size}px b{batch}", s, ceiling, bare, f["samples_per_s"], ratios[-1],
                         f["data_wait_fraction"], f["peak_memory_mb"]])
            values.update({f"{key}_model": ceiling, f"{key}_bare": bare, f"{key}_fit": f["samples_per_s"],
                           f"{key}_ratio": ratios[-1], f"{key}_wait": f["data_wait_fraction"]})
    rep.section("(1) Synthetic images: images/s", "")
    rep.table(["model", "setting", "model only", "bare loop", "fit", "fit / bare", "fit data wait", "peak MB"], rows)

    wait_rows, waits = [], {}
    for n in worker_counts:
        if not budget.allows(f"loader_workers={n}"):
            continue
        data = {"name": "imagefolder", "root": str(jpegs), "image_size": jpeg_size, "loader_workers": n}
        f = run_fit(fit_config(jpeg_model, jpeg_size, n_classes, jpeg_batch, 0, "bf16_cl", gpu, data=data))
        waits[n] = f["data_wait_fraction"]
        wait_rows.append([n, f["data_wait_fraction"], f["samples_per_s"]])
        values[f"jpeg_wait_w{n}"] = f["data_wait_fraction"]
    if args.ray_data and budget.allows("ray data"):
        source = {"format": "images", "train": str(jpegs / "train"), "val": str(jpegs / "val")}
        data = {"name": "raydata", "image_size": jpeg_size, "source": source}
        f = ray_data_fit(fit_config(jpeg_model, jpeg_size, n_classes, jpeg_batch, 0, "bf16_cl", gpu, data=data),
                         cpus, device)
        waits["ray_data"] = f["data_wait_fraction"]
        wait_rows.append([f"Ray Data ({cpus} CPUs)", f["data_wait_fraction"], f["samples_per_s"]])
        values["jpeg_wait_ray_data"] = f["data_wait_fraction"]
    rep.section("(2) JPEG image folder", f"{per_class * n_classes} training JPEGs of {side}x{side} "
                f"({fmt(kb)} KB each on average), read at {jpeg_size} px, batch {jpeg_batch}, {jpeg_model} bf16 + "
                "channels_last; the last of 2 epochs. Ray Data: `data.name: raydata` (tuning.driver.ingest) on a "
                "private local Ray cluster, decoding in its tasks"
                + ("." if args.ray_data else " (not run: --no-ray-data)."))
    rep.table(["loader workers", "data wait", "images/s"], wait_rows)

    n_gpu = torch.cuda.device_count()
    if (n_gpu > 1 or not gpu) and budget.allows("ddp"):
        world, backend = (n_gpu, "nccl") if gpu else (2, "gloo")
        model, size, classes, batch, steps = models[0]
        f = ddp(fit_config(model, size, classes, batch, steps, "bf16_cl", gpu), world, backend)
        single = fits.get(f"{SHORT.get(model, model)}_bf16_cl")
        eff = f["samples_per_s_total"] / (world * single) if single else None
        rep.section("(3) DDP", f"fit on {world} processes ({backend}), {model} bf16 + channels_last")
        rep.table(["workers", "images/s total", "per worker", "scaling efficiency"],
                  [[world, f["samples_per_s_total"], f["samples_per_s"], eff]])
        values.update(ddp_world=world, ddp_total=f["samples_per_s_total"], ddp_efficiency=eff)
    else:
        rep.section("(3) DDP", f"not run: {n_gpu} GPU on this machine")
    rep.section("Anchors (published; not measured here)")
    rep.table(["source", "figure"], ANCHORS)

    bf16_x = fits["rn50_bf16"] / fits["rn50_fp32"] if {"rn50_bf16", "rn50_fp32"} <= set(fits) else None
    goals = {"goal_fit_ratio_met": min(ratios) >= GOAL_RATIO if ratios and gpu else None,
             "goal_bf16_2x_met": bf16_x >= GOAL_BF16 if bf16_x and gpu else None,
             "goal_wait_met": min(waits.values()) <= GOAL_WAIT if waits and gpu else None}
    rep.section("Goals", "\n".join([
        f"- fit >= {GOAL_RATIO} of the bare loop in every setting: {fmt(goals['goal_fit_ratio_met'])} "
        f"(lowest {fmt(min(ratios) if ratios else None)})",
        f"- bf16 >= {GOAL_BF16}x fp32 (ResNet-50, fit): {fmt(goals['goal_bf16_2x_met'])} ({fmt(bf16_x)}x)",
        f"- data wait <= {GOAL_WAIT:.0%} at 224 px with enough loader workers or Ray Data: "
        f"{fmt(goals['goal_wait_met'])} "
        f"(lowest {fmt(min(waits.values()) if waits else None)})",
        *(["- not judged: a CPU smoke run"] if not gpu else []),
        *([f"- skipped (past {budget.limit_s:.0f} s): {', '.join(budget.skipped)}"] if budget.skipped else [])]))
    values.update(min_fit_ratio=min(ratios) if ratios else None, bf16_over_fp32=bf16_x, **goals,
                  skipped=len(budget.skipped))
    work.cleanup()
    rep.finish(values)


if __name__ == "__main__":
    main()
