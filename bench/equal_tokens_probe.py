"""What splitting B1xT16384's sequence into segments could at best buy with the current kernels, and where the
Mosaic scan starts to win.

Sequence parallelism (segments of one row scanned by separate programs, their start states passed on) gives a
B1 prefill the grid of a batched one. Its cost-free best case is therefore the same tokens laid out as a batch:
B x T/B for B in {1, 2, 4, 8, 16}, every row full. This times chunk_prefill there with each scan (Triton 32- and
64-wide, Mosaic 64-wide) and the prep alone, and checks each config's outputs against the first config's. Any
real split also pays for the segments' transition products and the pass that chains them, so these rows bound it
from below. Two more sections: the prep on one warp (`prep_warps`), and the Triton 32-wide against the Mosaic
64-wide scan on grids around one wave of Mosaic programs (`mosaic_threshold`). Writes JSON to
$OUT/equal_tokens.json (or /tmp); us per call.

    python bench/equal_tokens_probe.py [equal_tokens,prep_warps,mosaic_threshold]
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
from bench.kernels import (  # noqa: E402
    DK, chunk_flops, chunk_loop_seconds, gdr_bytes, gdr_inputs, rel_err, time_jax_calls,
)
from bench.run_info import run_info  # noqa: E402
from pallas_kernels.gated_delta_rule.chunk import chunk_prefill, chunk_prep  # noqa: E402

TOKENS = 16384
SCALE = DK**-0.5
CONFIGS = {
    "triton32": dict(scan="triton", block_v=32),
    "triton64": dict(scan="triton", block_v=64),
    "mosaic64": dict(scan="mosaic"),
}


def equal_tokens_rows(out: dict, path: pathlib.Path) -> None:
    for batch in (1, 2, 4, 8, 16):
        seq_len = TOKENS // batch
        inputs = q, k, _, g, beta, _ = gdr_inputs(batch, seq_len)
        lengths = jnp.full((batch,), seq_len, jnp.int32)
        first = None
        for name, cfg in CONFIGS.items():
            loop_s = chunk_loop_seconds(cfg, inputs, lengths)
            o, s = chunk_prefill(*inputs, lengths, scale=SCALE, **cfg)
            first = first or (o, s)
            out["rows"].append({
                "name": f"B{batch}xT{seq_len} {name} loop", "us": loop_s * 1e6,
                "ns_per_token": loop_s * 1e9 / TOKENS, "bytes": gdr_bytes(batch, seq_len),
                "flops": chunk_flops(batch, seq_len),
                "rel_err_vs_first_o": rel_err(o, first[0]), "rel_err_vs_first_state": rel_err(s, first[1]),
            })
            print(json.dumps(out["rows"][-1]), flush=True)
        prep = jax.jit(lambda *a: chunk_prep(*a, lengths, scale=SCALE))
        out["rows"].append({"name": f"B{batch}xT{seq_len} prep-only call",
                            "us": time_jax_calls(prep, (q, k, g, beta)) * 1e6})
        print(json.dumps(out["rows"][-1]), flush=True)
        path.write_text(json.dumps(out, indent=1))


def prep_warps_rows(out: dict, path: pathlib.Path) -> None:
    """The prep on one warp per program (never tried: two beat four and eight). Premise: it is latency-bound at
    four two-warp programs per SM (255 registers); one warp doubles the programs an SM holds, at the price of
    twice the registers' worth of tiles per thread, i.e. more spills."""
    for batch in (1, 8):
        seq_len = TOKENS // batch
        inputs = q, k, _, g, beta, _ = gdr_inputs(batch, seq_len)
        lengths = jnp.full((batch,), seq_len, jnp.int32)
        default = chunk_prep(q, k, g, beta, lengths, scale=SCALE)
        for warps, heads in ((2, None), (1, None), (1, 1)):
            prep = jax.jit(lambda *a, w=warps, h=heads: chunk_prep(*a, lengths, scale=SCALE, num_warps=w,
                                                                   heads_per_program=h))
            outs = prep(q, k, g, beta)
            out["rows"].append({
                "name": f"B{batch}xT{seq_len} prep-only call warps={warps} heads={heads}",
                "us": time_jax_calls(prep, (q, k, g, beta)) * 1e6,
                "max_rel_err_vs_default": max(rel_err(a, b) for a, b in zip(outs, default)),
            })
            print(json.dumps(out["rows"][-1]), flush=True)
        loop_s = chunk_loop_seconds(dict(prep_warps=1), inputs, lengths)
        out["rows"].append({"name": f"B{batch}xT{seq_len} default scan, prep_warps=1 loop", "us": loop_s * 1e6})
        print(json.dumps(out["rows"][-1]), flush=True)
        path.write_text(json.dumps(out, indent=1))


def mosaic_threshold_rows(out: dict, path: pathlib.Path) -> None:
    """Triton 32-wide vs Mosaic 64-wide scans where the Mosaic grid is 0.5-1 wave of programs (B x Hv x Dv / 64
    against the SM count), at several lengths: the rule before this probe took Mosaic only past one wave of
    Mosaic programs (two of 32-wide ones)."""
    for hk, hv, batch, seq_len in ((16, 32, 2, 2048), (16, 32, 2, 4096), (16, 32, 2, 8192), (20, 40, 1, 8192),
                                   (24, 48, 1, 8192), (12, 24, 2, 8192), (16, 32, 1, 8192)):
        inputs = gdr_inputs(batch, seq_len, num_k_heads=hk, num_v_heads=hv)
        lengths = jnp.full((batch,), seq_len, jnp.int32)
        results = {}
        for name in ("triton32", "mosaic64"):
            seconds = chunk_loop_seconds(CONFIGS[name], inputs, lengths)
            results[name] = chunk_prefill(*inputs, lengths, scale=SCALE, **CONFIGS[name])
            out["rows"].append({
                "name": f"Hk{hk} Hv{hv} B{batch}xT{seq_len} {name} loop", "us": seconds * 1e6,
                "mosaic_programs": batch * hv * 2,
                "rel_err_vs_triton32_o": rel_err(results[name][0], results["triton32"][0]),
            })
            print(json.dumps(out["rows"][-1]), flush=True)
        path.write_text(json.dumps(out, indent=1))


def main() -> None:
    sections = {"equal_tokens": equal_tokens_rows, "prep_warps": prep_warps_rows,
                "mosaic_threshold": mosaic_threshold_rows}
    chosen = sys.argv[1].split(",") if len(sys.argv) > 1 else list(sections)
    out = {**run_info(), "what": __doc__.split("\n\n")[0], "sections": chosen, "rows": []}
    path = pathlib.Path(os.environ.get("OUT", "/tmp"), "equal_tokens.json")
    for name in chosen:
        sections[name](out, path)


if __name__ == "__main__":
    main()
