"""A trial's checkpoints on the results storage (a local path or a URI): each found with its
``meta.json`` (readable without torch), and the best by the experiment's metric and the latest."""
from __future__ import annotations

import json

from tuning.analysis.ranking import rank


def find_checkpoints(path: str) -> list[tuple[str, dict]]:
    """(directory, meta) of every schedtune checkpoint directly under ``path`` (local or URI)."""
    import pyarrow.fs as pafs

    try:
        fs, root = pafs.FileSystem.from_uri(path)
    except Exception:
        fs, root = pafs.LocalFileSystem(), path
    out = []
    try:
        infos = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    except OSError:
        return []
    for info in infos:
        if info.type != pafs.FileType.Directory:
            continue
        try:
            with fs.open_input_stream(f"{info.path}/meta.json") as f:
                out.append((info.path, json.loads(f.read())))
        except (OSError, ValueError):
            continue
    return [(p if "://" not in path else path.split("://")[0] + "://" + p, m) for p, m in out]


def best_and_last(checkpoints: list[tuple[str, dict]], metric: str, mode: str):
    """The best-by-metric and the latest of ``find_checkpoints``' results (None when empty)."""
    if not checkpoints:
        return None, None
    last = max(checkpoints, key=lambda c: c[1]["epoch"])
    scored = rank([c for c in checkpoints if metric in c[1].get("metrics", {})],
                  lambda c: c[1]["metrics"][metric], mode)
    return (scored[0] if scored else last), last
