"""Can the prep of one segment of a B1 sequence run under the scan of the previous one?

At B1xT16384 both chunked kernels are latency-bound at low occupancy: the scan runs one 4-warp program on 128 of
the H200's 132 SMs, the prep four 2-warp programs per SM (bench/KERNELS_NOTES.md, "What bounds"), and they run one
after the other (~185 + ~395 us). `chunk_prefill(..., segments=n)` splits the sequence into n segments, each with
its own prep and scan; a segment's prep depends on nothing but the inputs, so it may run beside the previous
segment's scan if XLA launches them concurrently and their programs fit on the SMs together. XLA's command
buffers (CUDA graphs) run independent kernels concurrently only with
`--xla_gpu_command_buffer_scheduling_mode=CONCURRENT` (the default, LHS, serialises them), so run this once per
mode; the mode is recorded with the rows. Times chunk_prefill (loop and call) at several lengths and segment
counts and checks every output against the unsplit call. Writes $OUT/segments_<mode>.json (or /tmp); us.

    python bench/segments_probe.py
    XLA_FLAGS=--xla_gpu_command_buffer_scheduling_mode=CONCURRENT python bench/segments_probe.py
    python bench/segments_probe.py once   # one B1xT16384 call in 4 segments, for a profiler's launch figures
"""

from __future__ import annotations

import json
import os
import pathlib
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from bench.equal_tokens_probe import SCALE, loop_seconds  # noqa: E402
from bench.kernels import gdr_inputs, rel_err, time_jax_calls  # noqa: E402
from bench.run_info import run_info  # noqa: E402
from pallas_kernels.gated_delta_rule.chunk import chunk_prefill  # noqa: E402

SHAPES = {(1, 16384): (1, 2, 4, 8), (1, 4096): (1, 2, 4), (1, 1024): (1, 2, 4)}


def main() -> None:
    if sys.argv[1:] == ["once"]:
        inputs = gdr_inputs(1, 16384)
        jax.block_until_ready(chunk_prefill(*inputs, jnp.array([16384]), scale=SCALE, scan="triton", segments=4))
        return
    flags = os.environ.get("XLA_FLAGS", "")
    mode = "concurrent" if "scheduling_mode=CONCURRENT" in flags else "default"
    out = {**run_info(), "what": __doc__.split("\n\n")[0], "xla_flags": flags, "rows": []}
    path = pathlib.Path(os.environ.get("OUT", "/tmp"), f"segments_{mode}.json")
    for (batch, seq_len), counts in SHAPES.items():
        inputs = gdr_inputs(batch, seq_len)
        lengths = jnp.full((batch,), seq_len, jnp.int32)
        unsplit = chunk_prefill(*inputs, lengths, scale=SCALE, scan="triton")
        for segments in counts:
            cfg = dict(scan="triton", segments=segments)
            call = jax.jit(lambda *a, cfg=cfg: chunk_prefill(*a, lengths, scale=SCALE, **cfg))
            o, s = call(*inputs)
            out["rows"].append({
                "name": f"B{batch}xT{seq_len} segments={segments}", "mode": mode,
                "loop_us": loop_seconds(cfg, inputs, lengths) * 1e6,
                "call_us": time_jax_calls(call, inputs) * 1e6,
                "rel_err_vs_unsplit_o": rel_err(o, unsplit[0]), "rel_err_vs_unsplit_state": rel_err(s, unsplit[1]),
            })
            print(json.dumps(out["rows"][-1]), flush=True)
            path.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
