"""What every bench result records about its run: device, versions, commit and date."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess

import jax


def run_info() -> dict:
    """The device kind, jax and Python versions, commit (BENCH_COMMIT when the tree travelled without .git) and
    UTC date of this run."""
    commit = os.environ.get("BENCH_COMMIT") or subprocess.run(
        ["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip() or "unknown"
    return dict(device=jax.devices()[0].device_kind, jax=jax.__version__, python=platform.python_version(),
                commit=commit, date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
