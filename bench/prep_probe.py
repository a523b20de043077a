"""The Triton prep's triangular inverse (bench/KERNELS_NOTES.md item 22), at Qwen3.5 shapes, device time per call
under jax.profiler; writes $OUT/prep_probe.json (or /tmp).

`inverse_steps`: the prep with its diagonal blocks' doubling steps cut (0, 1, 2 of the 32-row blocks' 4),
outputs wrong on purpose: the gap to the full prep bounds what any faster inverse could gain.
`block_rows`: the prep and the whole chunk_prefill with the inverse built from 16-, 32- (the default) and
64-row blocks, outputs checked against the default's.

    python bench/prep_probe.py [inverse_steps,block_rows]
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from bench.kernels import DK, gdr_inputs, rel_err  # noqa: E402
from bench.prefill_share import profiled_kernel_seconds  # noqa: E402
from bench.run_info import run_info  # noqa: E402
from pallas_kernels.gated_delta_rule import chunk  # noqa: E402

CALLS = 20
FULL_STEPS = int(math.log2(32)) - 1  # the default 32-row diagonal blocks


def inverse_with_steps(steps: int):
    """chunk._unit_lower_inverse with only `steps` doubling steps (the full one has FULL_STEPS)."""

    def inverse(a_nn, low_precision):
        rows, cols = (jax.lax.broadcasted_iota(jnp.int32, a_nn.shape, d) for d in (0, 1))
        inverse_nn, power_nn = jnp.where(rows == cols, 1.0, 0.0) - a_nn, a_nn
        for _ in range(steps):
            power_nn = chunk._dot(power_nn, power_nn, low_precision=low_precision)
            inverse_nn = inverse_nn + chunk._dot(inverse_nn, power_nn, low_precision=low_precision)
        return inverse_nn

    return inverse


def main() -> None:
    sections = {"inverse_steps": inverse_steps_rows, "block_rows": block_rows_rows}
    chosen = sys.argv[1].split(",") if len(sys.argv) > 1 else list(sections)
    out = {**run_info(), "what": __doc__.split("\n\n")[0], "sections": chosen, "rows": []}
    path = pathlib.Path(os.environ.get("OUT", "/tmp"), "prep_probe.json")
    for name in chosen:
        sections[name](out, path)


def device_us(fn, *args) -> dict[str, float]:
    """Device microseconds per call of fn(*args) by kernel name (CALLS calls under jax.profiler)."""
    jax.block_until_ready(fn(*args))
    kernels = profiled_kernel_seconds(lambda: jax.block_until_ready([fn(*args) for _ in range(CALLS)]))
    return {name: seconds * 1e6 / CALLS for name, seconds in kernels.items()}


def inverse_steps_rows(out: dict, path: pathlib.Path) -> None:
    full_inverse = chunk._unit_lower_inverse
    for batch, seq_len in ((1, 16384), (8, 2048)):
        q, k, _, g, beta, _ = gdr_inputs(batch, seq_len)
        lengths = jnp.full((batch,), seq_len, jnp.int32)
        for steps in (FULL_STEPS, 2, 1, 0):
            chunk._unit_lower_inverse = full_inverse if steps == FULL_STEPS else inverse_with_steps(steps)
            jax.clear_caches()
            prep = jax.jit(lambda *a: chunk.chunk_prep(*a, lengths, scale=DK**-0.5))
            out["rows"].append({"name": f"B{batch}xT{seq_len} prep, {steps} of {FULL_STEPS} doubling steps",
                                "us": device_us(prep, q, k, g, beta)["gdr_chunk_prep"]})
            print(json.dumps(out["rows"][-1]), flush=True)
            path.write_text(json.dumps(out, indent=1))
    chunk._unit_lower_inverse = full_inverse
    jax.clear_caches()


def block_rows_rows(out: dict, path: pathlib.Path) -> None:
    for batch, seq_len in ((1, 512), (1, 4096), (1, 16384), (8, 2048), (32, 1024)):
        inputs = q, k, _, g, beta, _ = gdr_inputs(batch, seq_len)
        lengths = jnp.full((batch,), seq_len, jnp.int32)
        default = None
        for block_rows in (32, 16, 64):
            prep = jax.jit(lambda *a, r=block_rows: chunk.chunk_prep(*a, lengths, scale=DK**-0.5, block_rows=r))
            prefill = jax.jit(lambda *a, r=block_rows: chunk.chunk_prefill(*a, lengths, scale=DK**-0.5,
                                                                           prep_block_rows=r))
            outputs = (*prep(q, k, g, beta)[:2], *prefill(*inputs))
            default = default or outputs
            whole = device_us(prefill, *inputs)
            out["rows"].append({
                "name": f"B{batch}xT{seq_len} block_rows={block_rows}",
                "prep_alone_us": device_us(prep, q, k, g, beta)["gdr_chunk_prep"],
                "chunk_prefill_us": sum(whole.values()), "chunk_prefill_kernels_us": whole,
                "rel_err_vs_32_rows": dict(zip(("T", "scores", "o", "state"),
                                               (rel_err(a, b) for a, b in zip(outputs, default)))),
            })
            print(json.dumps(out["rows"][-1]), flush=True)
            path.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
