"""Which Ray cluster a command uses, chosen as Ray's own tools choose it.

- ``schedtune tune`` (``ray.init``'s rule): ``--address`` when given (``local``: a private local
  cluster, whatever the environment says), else ``$RAY_ADDRESS``, else a private local cluster.
- The job commands (``submit``, ``jobs``, ``stop``, ``logs``; ``ray job``'s rule): ``--address``
  when given, else ``$RAY_API_SERVER_ADDRESS``, else ``$RAY_ADDRESS`` (a job API URL, or a cluster
  address whose GCS names its dashboard).
"""
from __future__ import annotations

import os
from typing import Optional

LOCAL = "local"   # --address local: a private local cluster, whatever RAY_ADDRESS says
JOB_ADDRESS_VARS = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")   # the job API's fallbacks, in Ray's order


def cluster_to_join(address: Optional[str]) -> tuple[Optional[str], str]:
    """(the address ``tune`` joins, or None for a private local cluster; where that came from:
    ``"--address"``, ``"RAY_ADDRESS"`` or ``"local"``)."""
    if address == LOCAL:
        return None, LOCAL
    if address:
        return address, "--address"
    env = os.environ.get("RAY_ADDRESS", "").strip()
    if env and env != LOCAL:
        return env, "RAY_ADDRESS"
    return None, LOCAL


def job_api_address(address: Optional[str]) -> tuple[Optional[str], str]:
    """(the job API address the job commands use, or None when nothing names one; where it came
    from: ``"--address"`` or the environment variable)."""
    if address:
        return address, "--address"
    for var in JOB_ADDRESS_VARS:
        value = os.environ.get(var, "").strip()
        if value:
            return value, var
    return None, ""

