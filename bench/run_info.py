"""What every bench result records about its run (device, versions, commit and date), and where it is written."""

from __future__ import annotations

import datetime
import json
import os
import pathlib
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


def write_result(out_dir: str | pathlib.Path, bench: str, result: dict, *, fp8: bool = False, tiny: bool = False,
                 suffix: str = "", device: str | None = None) -> pathlib.Path:
    """Writes `result` as `<out_dir>/<bench>[-fp8][-tiny]-<device><suffix>.json` (the device kind, or ``device``
    for a program compiled for a GPU not attached, with spaces as underscores, so each GPU keeps its own file),
    prints and returns the path."""
    device = (device or jax.devices()[0].device_kind).replace(" ", "_")
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{bench}{'-fp8' if fp8 else ''}{'-tiny' if tiny else ''}-{device}{suffix}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")
    return path
