"""What every benchmark script shares: its command line, the machine header, tables and the
RESULT line (the report). The processes a benchmark runs and measures are bench/processes.py.

A script is ``python bench/NAME.py [--quick | --smoke] [--out DIR]``. It prints a header (the
machine, the library versions, the ``uptime`` load: figures taken on a busy machine are noisy),
one or more tables, and ends with exactly one line ``RESULT NAME key=value ...``; the same
header, tables and RESULT line go to ``DIR/NAME.md`` (default ``bench/results/``).

Modes: full (the default: the figures docs/benchmarks.md quotes), ``--quick`` (under 3 minutes
on a 2-core CPU machine), ``--smoke`` (seconds; meaningless figures, for tests/bench/test_bench.py).
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "bench" / "results"
_KEY = re.compile(r"^[a-z][a-z0-9_]*$")


# ----------------------------------------------------------------------------- command line

def parse_args(description: str, configure: Optional[Callable[[argparse.ArgumentParser], None]] = None,
               argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """``--quick`` / ``--smoke`` / ``--out`` plus whatever ``configure`` adds; ``args.mode`` is
    "full", "quick" or "smoke"."""
    p = argparse.ArgumentParser(description=description)
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="the reduced run: under 3 minutes on a 2-core CPU machine")
    size.add_argument("--smoke", action="store_true",
                      help="seconds, meaningless figures: only checks that the script runs (tests)")
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help=f"where NAME.md goes (default {RESULTS_DIR})")
    if configure is not None:
        configure(p)
    args = p.parse_args(argv)
    args.mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    return args


def pick(args: argparse.Namespace, full: Any, quick: Any, smoke: Any) -> Any:
    """The value for the run's mode."""
    return {"full": full, "quick": quick, "smoke": smoke}[args.mode]


# ----------------------------------------------------------------------------- the machine

def psutil_module():
    """psutil: installed with the test extras; otherwise the copy Ray ships (``import ray`` puts
    ray/thirdparty_files on sys.path), so a plain ``pip install -e .`` is enough."""
    try:
        import psutil
    except ImportError:
        import ray  # noqa: F401
        import psutil
    return psutil


def load_line() -> str:
    """``uptime``'s output (the load averages say how busy the machine was)."""
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        one, five, fifteen = os.getloadavg()
        return f"load average: {one:.2f}, {five:.2f}, {fifteen:.2f}"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    """One line: CPU, cores, memory, GPU, and the versions that matter for the figures."""
    psutil = psutil_module()

    parts = [f"{cpu_model()}, {os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB RAM"]
    versions = [f"python {platform.python_version()}"]
    for mod in ("torch", "ray", "mlflow"):
        try:
            versions.append(f"{mod} {__import__(mod).__version__}")
        except ImportError:
            pass
    try:
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
        build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "CPU build"
        parts.append(f"{gpu} (torch {build})")
    except ImportError:
        pass
    return "; ".join(parts) + "; " + ", ".join(versions) + f"; {platform.system()} {platform.release()}"


# ----------------------------------------------------------------------------- numbers and tables

def fmt(v: Any, digits: int = 3) -> str:
    """A table cell / RESULT value: floats to ``digits`` significant digits, None as "-"."""
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if not math.isfinite(v) or v == 0:
            return str(v) if v else "0"
        return f"{v:.0f}" if abs(v) >= 10 ** digits else f"{v:.{digits}g}"
    return str(v)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    m = sum(values) / n
    return m, (math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0)


def median(values: Sequence[float]) -> float:
    s = sorted(values)
    n = len(s)
    if n == 0:
        return math.nan
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def diffs(xs: Sequence[float]) -> list[float]:
    """Successive differences: per-epoch amounts from cumulative readings."""
    return [b - a for a, b in zip(xs, xs[1:])]


def markdown_table(columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub markdown table; cells through ``fmt``."""
    cells = [[fmt(c) for c in r] for r in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    line = lambda r: "| " + " | ".join(x.ljust(w) for x, w in zip(r, widths)) + " |"   # noqa: E731
    return "\n".join([line(columns), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in cells])


def result_line(name: str, values: dict[str, Any]) -> str:
    """``RESULT name key=value ...``: keys are lower_snake_case, values have no spaces."""
    if not _KEY.match(name):
        raise ValueError(f"benchmark name must match {_KEY.pattern}, got {name!r}")
    parts = [f"RESULT {name}"]
    for k, v in values.items():
        if not _KEY.match(k):
            raise ValueError(f"RESULT key must match {_KEY.pattern}, got {k!r}")
        text = fmt(v, 4)
        if not text or any(c.isspace() for c in text):
            raise ValueError(f"RESULT value of {k} must be non-empty without spaces, got {text!r}")
        parts.append(f"{k}={text}")
    return " ".join(parts)


RESULT_RE = re.compile(r"^RESULT ([a-z][a-z0-9_]*)((?: [a-z][a-z0-9_]*=\S+)+)$")


def parse_result(line: str) -> tuple[str, dict[str, str]]:
    """The inverse of ``result_line`` (for tests and for collecting figures)."""
    m = RESULT_RE.match(line.strip())
    if not m:
        raise ValueError(f"not a RESULT line: {line!r}")
    return m.group(1), dict(kv.split("=", 1) for kv in m.group(2).split())


# ----------------------------------------------------------------------------- the report

@dataclass
class Report:
    """Collects what a script prints and writes it to ``out/NAME.md`` at ``finish``."""
    name: str
    args: argparse.Namespace
    title: str = ""
    _md: list[str] = field(default_factory=list)
    _t0: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        head = [f"# {self.title or self.name} ({self.args.mode} mode)", "",
                f"- date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}",
                f"- machine: {machine()}",
                f"- load at start: `{load_line()}`",
                f"- command: `{command(self.name)}`"]
        self._emit("\n".join(head))

    def _emit(self, text: str) -> None:
        print(text, flush=True)
        self._md.append(text)

    def section(self, title: str, text: str = "") -> None:
        self._emit(f"\n## {title}\n" + (f"\n{text}" if text else ""))

    def table(self, columns: Sequence[str], rows: Iterable[Sequence[Any]], caption: str = "") -> None:
        self._emit(("\n" + caption + "\n" if caption else "") + "\n" + markdown_table(columns, rows))

    def note(self, text: str) -> None:
        self._emit("\n" + text)

    def finish(self, values: dict[str, Any]) -> str:
        """Write ``out/NAME.md`` and print the RESULT line (last line of the output)."""
        values = {"mode": self.args.mode, **values, "runtime_s": round(time.monotonic() - self._t0, 1)}
        line = result_line(self.name, values)
        self._emit(f"\n- load at end: `{load_line()}`\n- runtime: {values['runtime_s']} s wall, {cpu_seconds():.0f} s "
                   f"CPU in this process and the processes it waited for\n\n```\n{line}\n```")
        out = Path(self.args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{self.name}.md").write_text("\n".join(self._md) + "\n")
        print(line, flush=True)
        return line


def cpu_seconds() -> float:
    """User + system CPU time of this process and of its children that have been waited for."""
    import resource

    return sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
               for f in ("ru_utime", "ru_stime"))


def command(name: str) -> str:
    """The command line that reproduces this run (without --out, which only says where to write)."""
    argv, skip = [], False
    for a in sys.argv[1:]:
        if skip or a.startswith("--out="):
            skip = False
            continue
        if a == "--out":
            skip = True
            continue
        argv.append(a)
    return shlex.join(["python", f"bench/{name}.py", *argv])
