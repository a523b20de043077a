"""The Triton chunk scan's prefetch depth at batch 1, timed and under Nsight Compute (bench/KERNELS_NOTES.md item
21).

ncu at 1f46380 (H200, B1xT16384, one 32-wide program per SM on three stages) put ~30% of the scan's stall samples
on the long scoreboard (at the fences that publish register tiles to wgmma and at address arithmetic) and none on
the explicit wait for a stage's cp.async copies. A fourth stage (221 KB of shared memory, still one program per
SM) prefetches one chunk further; if the stages are not late, it gains nothing. `time` runs chunk_prefill (loop
timing, and device time per kernel under jax.profiler) at B1 from 2048 to 16384 tokens on three and four stages
and B2xT8192 on two and three, checks outputs against the default's and writes $OUT/scan_stages.json (or /tmp);
`ncu NAME` runs one configuration, warmed up, for Nsight Compute to profile its last scan:

    python bench/scan_stages_probe.py time
    ncu --set full -k regex:gdr_chunk_scan --launch-skip 2 --launch-count 1 python bench/scan_stages_probe.py ncu b1
"""

from __future__ import annotations

import json
import os
import pathlib
import sys

import jax
import jax.numpy as jnp

# Run as a script, the repo root replaces the script's directory: bench/kernels.py would shadow the `kernels`
# package that transformers imports.
if sys.path[0] == str(pathlib.Path(__file__).resolve().parent):
    sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])
from bench.kernels import DK, chunk_loop_seconds, gdr_inputs, profiled_kernel_seconds, rel_err  # noqa: E402
from bench.run_info import run_info  # noqa: E402
from pallas_kernels.gated_delta_rule.chunk import chunk_prefill  # noqa: E402

NCU_CONFIGS = {  # name: (batch, tokens per row, chunk_prefill options)
    "b1": (1, 16384, dict(scan="triton")),
    "b1_4stages": (1, 16384, dict(scan="triton", num_stages=4)),
    "b2": (2, 8192, dict(scan="triton", block_v=32)),
    "b8_mosaic": (8, 2048, dict(scan="mosaic")),
}
TIMED = [  # (batch, tokens per row, stage counts; the first is the default's)
    *[(1, seq_len, (3, 4)) for seq_len in (2048, 4096, 8192, 16384)],
    (2, 8192, (2, 3)),
]
PROFILED_CALLS = 20


def prefill(batch: int, seq_len: int, options: dict):
    inputs = gdr_inputs(batch, seq_len)
    lengths = jnp.full((batch,), seq_len, jnp.int32)
    return inputs, lengths, jax.jit(lambda *args: chunk_prefill(*args, lengths, scale=DK**-0.5, **options))


def warm_for_ncu(name: str) -> None:
    batch, seq_len, options = NCU_CONFIGS[name]
    inputs, _, call = prefill(batch, seq_len, options)
    for _ in range(3):
        jax.block_until_ready(call(*inputs))


def time_stages() -> None:
    out = {**run_info(), "what": __doc__.split("\n\n")[0], "rows": []}
    path = pathlib.Path(os.environ.get("OUT", "/tmp"), "scan_stages.json")
    for batch, seq_len, stage_counts in TIMED:
        first = None
        for stages in stage_counts:
            options = dict(scan="triton", block_v=32, num_stages=stages)
            inputs, lengths, call = prefill(batch, seq_len, options)
            o, state = call(*inputs)
            first = first or (o, state)
            kernels = profiled_kernel_seconds(lambda: jax.block_until_ready(
                [call(*inputs) for _ in range(PROFILED_CALLS)]))
            out["rows"].append({
                "name": f"B{batch}xT{seq_len} triton32 stages={stages} loop",
                "us": chunk_loop_seconds(options, inputs, lengths) * 1e6,
                "profiled_us_per_call": {name: seconds * 1e6 / PROFILED_CALLS for name, seconds in kernels.items()
                                         if seconds * 1e6 / PROFILED_CALLS > 1},
                "rel_err_vs_first_o": rel_err(o, first[0]), "rel_err_vs_first_state": rel_err(state, first[1]),
            })
            print(json.dumps(out["rows"][-1]), flush=True)
            path.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    if sys.argv[1:2] == ["ncu"]:
        warm_for_ncu(sys.argv[2])
    elif sys.argv[1:] in ([], ["time"]):
        time_stages()
    else:
        sys.exit(f"usage: {sys.argv[0]} [time | ncu {'|'.join(NCU_CONFIGS)}]")
