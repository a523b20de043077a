"""Probe (not yet part of the library): the T=1 decode kernel with a persistent grid. Each program walks
`tiles` state tiles (strided over the grid, so neighbouring programs touch neighbouring memory) and issues the
next tile's loads before it reduces and stores the current one, so its memory requests never drain between
tiles. Question: does that lift B64 on an H200 from 72-80% of copy bandwidth (one tile per program) to > 80%?
Answer (2026-12-02, bench/KERNELS_NOTES.md item 13): no; one tile per program stays as fast or faster.

    python bench/decode_persistent_probe.py --check      # CPU: interpreter against the reference
    python bench/decode_persistent_probe.py              # GPU: times default vs persistent at B64, B256
"""

from __future__ import annotations

import argparse
import functools
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

# Run as a script, the repo root replaces the script's directory: bench/kernels.py would shadow the `kernels`
# package that transformers imports.
if sys.path[0] == str(pathlib.Path(__file__).resolve().parent):
    sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])
from bench.kernels import gdr_bytes, gdr_inputs, measure_ceilings, rel_err, time_jax_loop  # noqa: E402
from pallas_kernels.gated_delta_rule.recurrent import decode_tile, recurrent_decode  # noqa: E402
from pallas_kernels.gated_delta_rule.reference import recurrent_gated_delta_rule_ref  # noqa: E402


def _kernel(lengths_ref, g_ref, beta_ref, q_ref, k_ref, v_ref, state_in_ref, o_ref, state_ref, *,
            scale, use_qk_l2norm, tiles, num_v_heads, v_tiles, group, block_v):
    num_programs = pl.num_programs(0)
    p = pl.program_id(0)

    def load(i):
        t = p + i * num_programs
        b, h, j = t // (num_v_heads * v_tiles), (t // v_tiles) % num_v_heads, t % v_tiles
        cols = pl.ds(pl.multiple_of(j * block_v, block_v), block_v)
        return ((b, h, cols), state_in_ref[b, h, :, cols], q_ref[b, h // group, :], k_ref[b, h // group, :],
                v_ref[b, h, cols], g_ref[b, h], beta_ref[b, h], lengths_ref[b] > 0)

    def process(tile):
        (b, h, cols), state, *operands = tile
        s_kv, o_v = decode_tile(lambda: state, *operands, scale=scale, use_qk_l2norm=use_qk_l2norm)
        state_ref[b, h, :, cols] = s_kv
        o_ref[b, h, cols] = o_v.astype(o_ref.dtype)

    def step(i, tile):
        following = load(i + 1)  # issued before this tile's reductions and stores
        process(tile)
        return following

    process(lax.fori_loop(0, tiles - 1, step, load(0)))


@functools.partial(jax.jit, static_argnames=("scale", "block_v", "tiles", "num_warps", "interpret"))
def persistent_decode(q_bhk, k_bhk, v_bhv, g_bh, beta_bh, state_bhkv, lengths_b, *, scale, block_v=64, tiles=4,
                      num_warps=4, interpret=False):
    batch, num_v_heads, head_v = v_bhv.shape
    group = num_v_heads // q_bhk.shape[1]
    v_tiles = head_v // block_v
    num_tiles = batch * num_v_heads * v_tiles
    assert num_tiles % tiles == 0
    kernel = functools.partial(_kernel, scale=scale, use_qk_l2norm=True, tiles=tiles, num_v_heads=num_v_heads,
                               v_tiles=v_tiles, group=group, block_v=block_v)
    whole = pl.BlockSpec(memory_space=None)
    return pl.pallas_call(
        kernel,
        grid=(num_tiles // tiles,),
        in_specs=[whole] * 7,
        out_specs=[whole, whole],
        out_shape=[jax.ShapeDtypeStruct(v_bhv.shape, v_bhv.dtype), jax.ShapeDtypeStruct(state_bhkv.shape, jnp.float32)],
        input_output_aliases={6: 1},
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name="gdr_persistent_decode",
    )(lengths_b, g_bh, beta_bh, q_bhk, k_bhk, v_bhv, state_bhkv)


def inputs(batch, dtype, seed=0):
    """One decode step's inputs at the bench's Qwen3.5 shapes, q/k/v/beta in `dtype`."""
    q, k, v, g, beta, state = gdr_inputs(batch, 1, seed)
    return (*(x[:, 0].astype(dtype) for x in (q, k, v)), g[:, 0], beta[:, 0].astype(dtype), state)


def check(batch, dtype, tol, interpret, **cfg):
    q, k, v, g, beta, state = inputs(batch, dtype, seed=batch)
    lengths = jnp.asarray(np.random.default_rng(batch).integers(0, 2, batch), jnp.int32)
    with jax.default_matmul_precision("highest"):
        up = [x.astype(jnp.float32)[:, None] for x in (q, k, v, g, beta)]
        o_ref, s_ref = recurrent_gated_delta_rule_ref(*up, initial_state=state, lengths=lengths)
    o, s = persistent_decode(q, k, v, g, beta, jnp.array(state), lengths, scale=128**-0.5, interpret=interpret, **cfg)
    errs = rel_err(o, o_ref[:, 0]), rel_err(s, s_ref)
    assert np.all(np.isfinite(np.asarray(o))) and max(errs) < tol, (cfg, errs)
    return errs


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    if args.check:
        for cfg in [dict(block_v=32, tiles=2), dict(block_v=64, tiles=4), dict(block_v=128, tiles=3)]:
            print(cfg, check(3, jnp.float32, 1e-5, True, **cfg))
        return
    ceilings = measure_ceilings()
    print(jax.devices()[0].device_kind, ceilings, flush=True)
    configs = [dict(tiles=2), dict(tiles=4), dict(tiles=8), dict(tiles=4, num_warps=8),
               dict(tiles=2, block_v=128, num_warps=8), dict(tiles=4, block_v=32)]
    for cfg in configs:
        print("check", cfg, check(64, jnp.bfloat16, 1e-2, False, **cfg), flush=True)
    for batch in (64, 256):
        q, k, v, g, beta, state = inputs(batch, jnp.bfloat16)
        lengths = jnp.ones((batch,), jnp.int32)
        args_ = [q, k, v, g, beta]
        variants = {"default": functools.partial(recurrent_decode, scale=128**-0.5)}
        for cfg in configs:
            variants[str(cfg)] = functools.partial(persistent_decode, scale=128**-0.5, **cfg)
        for rnd in range(3):  # rounds alternate the variants so drift cannot land on one of them
            for name, fn in variants.items():
                step = lambda c, q, k, v, g, b, fn=fn: fn(q, k, v, g, b, c[1], lengths)
                t = time_jax_loop(step, (jnp.zeros_like(v), jnp.array(state)), args_, iters=20)
                pct = 100 * gdr_bytes(batch, 1) / t / 1e9 / ceilings["copy_GBps"]
                print(f"B{batch} round {rnd} {name:<32} {t * 1e6:8.1f} us {pct:5.1f}% copy", flush=True)


if __name__ == "__main__":
    main()
