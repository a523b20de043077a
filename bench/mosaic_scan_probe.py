"""Probe (not part of the library): the chunk scan written for Pallas' Mosaic GPU backend, one warpgroup per
(row, value head, v tile), fed by `plgpu.emit_pipeline` (TMA loads, two chunks in flight), every wgmma
operand in shared memory (the CPU interpreter rejects register operands). It takes the committed prep's
outputs (T, scores, row factors), so only the scan differs from `chunk_prefill`. Full rows only (no ragged
lengths).

Question: what does one chunk step cost in Mosaic GPU, against the Triton scan's ~1.45 us at B1xT16384?
Status (2026-12-02, ninth session): `--check` passes on the CPU (jax 0.12.0.1, GPU interpret mode with race
detection, Qwen3.5 heads at B2xT192, every config below: o within 1.1e-5 and state 2.5e-8 of chunk_prefill's,
bf16) and lowers for CUDA there, on jax 0.12.0.1 and 0.11.2; not yet compiled or timed on a GPU (the
session's device time ran out).

    python bench/mosaic_scan_probe.py --check       # CPU: GPU interpret mode against chunk_prefill
    python bench/mosaic_scan_probe.py --out DIR     # GPU: checks and times it against chunk_prefill
"""

from __future__ import annotations

import argparse
import functools
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from bench.kernels import DK, DV, HK, HV, gdr_inputs, rel_err, time_jax_calls  # noqa: E402
from bench.run_info import run_info  # noqa: E402
from pallas_kernels.gated_delta_rule.chunk import CHUNK, chunk_prefill, chunk_prep  # noqa: E402


def _swizzled(swizzle, itemsize=2):
    """Transforms of an SMEM buffer wgmma can read: rows tiled by 8, `swizzle` bytes per swizzled row. Mosaic
    GPU wants both operands of a wgmma swizzled alike, so every bf16 buffer here takes the narrowest one's."""
    return (plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle))


def mosaic_scan(q, k, v, prepared, state, *, block_v=32, stages=2, off_chain=False, interpret=False):
    t_mat, scores, gcum, q_fac, k_fac, w_fac, u_fac = prepared
    batch, seq_len, num_k_heads, head_k = q.shape
    num_v_heads, head_v = v.shape[2:]
    group = num_v_heads // num_k_heads
    num_chunks = seq_len // CHUNK
    bf16 = jnp.bfloat16
    wgmma_layout = plgpu.Layout.WGMMA
    row_layout = plgpu.Layout.WGMMA.reduce(1)
    operand = _swizzled(min(128, 2 * block_v))

    def body(q_g, k_g, v_g, t_g, p_g, gcum_g, qf_g, kf_g, wf_g, uf_g, s_in_g, o_g, s_out_g,
             s_smem, r_smem, vn_smem, x_smem, o_smem, s32_smem, barrier):
        bh, j = lax.axis_index("bh"), lax.axis_index("j")
        b, h = bh // num_v_heads, bh % num_v_heads
        cols = pl.ds(j * block_v, block_v)
        plgpu.copy_gmem_to_smem(s_in_g.at[b, h, :, cols], s32_smem, barrier)
        plgpu.barrier_wait(barrier)
        s_kv = plgpu.load(s32_smem, layout=wgmma_layout)

        rows = functools.partial(lax.broadcast_in_dim, shape=(CHUNK, block_v), broadcast_dimensions=[0])
        factor = lambda ref: rows(plgpu.load(ref, layout=row_layout))  # noqa: E731

        def store_output(o_cv, c):
            # The output goes out by hand: the interpreter rejects emit_pipeline's predicated output copies.
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)
            o_smem[...] = o_cv.astype(o_smem.dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_smem, o_g.at[b, pl.ds(c * CHUNK, CHUNK), h, cols])

        def step(indices, q_s, k_s, v_s, t_s, p_s, g_s, qf_s, kf_s, wf_s, uf_s, s_kv):
            # Register reads of the pipeline's buffers sit before the step's last commit_smem (a proxy fence):
            # the pipeline refills them by TMA, and the interpreter's race detector flags a read after it.
            decay = jnp.exp(g_s[CHUNK - 1])
            s_smem[...] = s_kv.astype(bf16)
            plgpu.commit_smem()

            def state_products(ks_ref, qs_ref):
                plgpu.wgmma(ks_ref, k_s, s_smem)
                plgpu.wgmma(qs_ref, q_s, s_smem)
                plgpu.wgmma_wait(0)
                return ks_ref[...], qs_ref[...]
            ks, qs = pl.run_scoped(state_products, plgpu.ACC((CHUNK, block_v), jnp.float32),
                                   plgpu.ACC((CHUNK, block_v), jnp.float32))
            v_cv = plgpu.load(v_s, layout=wgmma_layout).astype(jnp.float32)
            r_smem[...] = (factor(uf_s) * v_cv - factor(wf_s) * ks).astype(bf16)
            plgpu.commit_smem()

            def product(a_ref, b_ref, acc_ref):
                plgpu.wgmma(acc_ref, a_ref, b_ref)
                plgpu.wgmma_wait(0)
                return acc_ref[...]
            vnew = pl.run_scoped(functools.partial(product, t_s, r_smem), plgpu.ACC((CHUNK, block_v), jnp.float32))
            vn_smem[...] = vnew.astype(bf16)
            x_smem[...] = (factor(kf_s) * vnew).astype(bf16)
            qf = factor(qf_s)
            plgpu.commit_smem()

            def vnew_products(pv_ref, kx_ref):  # both read v_new only: one wait for the two
                plgpu.wgmma(pv_ref, p_s, vn_smem)
                plgpu.wgmma(kx_ref, k_s.transpose((1, 0)), x_smem)
                plgpu.wgmma_wait(0)
                return pv_ref[...], kx_ref[...]
            pv, kx = pl.run_scoped(vnew_products, plgpu.ACC((CHUNK, block_v), jnp.float32),
                                   plgpu.ACC((head_k, block_v), jnp.float32))
            store_output(qf * qs + pv, indices[0])
            return s_kv * decay + kx

        def step_off_chain(indices, q_s, k_s, v_s, t_s, p_s, g_s, qf_s, kf_s, wf_s, uf_s, s_kv):
            """The same step with the output's two products (q S, P v_new) issued after the state chain's and
            waited for only when the chain no longer needs the tensor cores' results: `wgmma_accumulator_load`
            with wait_n=1 waits for all but the last issued product. s_smem is refilled at the step's end
            (the next step's k S reads it at once) and seeded before the pipeline."""
            decay = jnp.exp(g_s[CHUNK - 1])
            load_after_all_but_last = functools.partial(plgpu.wgmma_accumulator_load, wait_n=1)

            def products(ks_ref, qs_ref, vn_ref, pv_ref, kx_ref):
                plgpu.wgmma(ks_ref, k_s, s_smem)
                plgpu.wgmma(qs_ref, q_s, s_smem)
                ks = load_after_all_but_last(ks_ref)
                v_cv = plgpu.load(v_s, layout=wgmma_layout).astype(jnp.float32)
                r_smem[...] = (factor(uf_s) * v_cv - factor(wf_s) * ks).astype(bf16)
                plgpu.commit_smem()
                plgpu.wgmma(vn_ref, t_s, r_smem)
                vnew = vn_ref[...]
                vn_smem[...] = vnew.astype(bf16)
                x_smem[...] = (factor(kf_s) * vnew).astype(bf16)
                qf = factor(qf_s)
                plgpu.commit_smem()
                plgpu.wgmma(kx_ref, k_s.transpose((1, 0)), x_smem)
                plgpu.wgmma(pv_ref, p_s, vn_smem)
                s_next = s_kv * decay + load_after_all_but_last(kx_ref)
                s_smem[...] = s_next.astype(bf16)  # q S and k S, its readers, are done (waited above)
                return s_next, qf * qs_ref[...] + pv_ref[...]
            s_next, o_cv = pl.run_scoped(products, *[plgpu.ACC((CHUNK, block_v), jnp.float32)] * 4,
                                         plgpu.ACC((head_k, block_v), jnp.float32))
            store_output(o_cv, indices[0])  # its commit_smem also fences s_smem's refill
            return s_next

        qk_spec = plgpu.BlockSpec((CHUNK, head_k), lambda c: (c, 0), transforms=operand)
        square = plgpu.BlockSpec((CHUNK, CHUNK), lambda c: (c, 0), transforms=operand)
        v_spec = plgpu.BlockSpec((CHUNK, block_v), lambda c: (c, j), transforms=operand)
        per_row = plgpu.BlockSpec((CHUNK,), lambda c: (c,))
        if off_chain:
            s_smem[...] = s_kv.astype(bf16)
            plgpu.commit_smem()
        pipeline = plgpu.emit_pipeline(
            step_off_chain if off_chain else step, grid=(num_chunks,), max_concurrent_steps=stages, init_carry=s_kv,
            in_specs=[qk_spec, qk_spec, v_spec, square, square, *[per_row] * 5],
        )
        s_kv = pipeline(q_g.at[b, :, h // group], k_g.at[b, :, h // group], v_g.at[b, :, h],
                        t_g.at[b, h], p_g.at[b, h], gcum_g.at[b, h], qf_g.at[b, h], kf_g.at[b, h], wf_g.at[b, h],
                        uf_g.at[b, h])
        s32_smem[...] = s_kv
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(s32_smem, s_out_g.at[b, h, :, cols])
        plgpu.wait_smem_to_gmem(0)

    b_operand = functools.partial(plgpu.SMEM, transforms=operand)
    kernel = plgpu.kernel(
        body,
        out_type=(jax.ShapeDtypeStruct(v.shape, v.dtype), jax.ShapeDtypeStruct(state.shape, jnp.float32)),
        scratch_types=[b_operand((head_k, block_v), bf16),
                       b_operand((CHUNK, block_v), bf16), b_operand((CHUNK, block_v), bf16),
                       b_operand((CHUNK, block_v), bf16), b_operand((CHUNK, block_v), v.dtype),
                       plgpu.SMEM((head_k, block_v), jnp.float32, transforms=_swizzled(min(128, 4 * block_v), 4)),
                       plgpu.Barrier(num_arrivals=1)],
        grid=(batch * num_v_heads, head_v // block_v), grid_names=("bh", "j"),
        interpret=plgpu.InterpretGPUParams(detect_races=True) if interpret else None,
    )
    return kernel(q, k, v, t_mat, scores, gcum, q_fac, k_fac, w_fac, u_fac, state)


def lowers_for_cuda(configs) -> None:
    """Mosaic GPU's lowering (layout inference, shared-memory budget) runs without a GPU: export for CUDA."""
    from jax import export

    batch, seq_len = 1, 4096
    spec = jax.ShapeDtypeStruct
    q = k = spec((batch, seq_len, HK, DK), jnp.bfloat16)
    v = spec((batch, seq_len, HV, DV), jnp.bfloat16)
    state = spec((batch, HV, DK, DV), jnp.float32)
    square = spec((batch, HV, seq_len, CHUNK), jnp.bfloat16)
    per_row = spec((batch, HV, seq_len), jnp.float32)
    for cfg in configs:
        fn = jax.jit(functools.partial(mosaic_scan, **cfg))
        export.export(fn, platforms=["cuda"])(q, k, v, (square, square, *[per_row] * 5), state)
        print(f"{cfg} lowers for CUDA", flush=True)


def run(batch, seq_len, configs, interpret) -> list[dict]:
    """Qwen3.5's GDN heads (bench.kernels' shapes): each config's outputs against chunk_prefill's and, on the
    GPU, its time per jitted call next to the prep's and the whole chunk_prefill's."""
    q, k, v, g, beta, state = gdr_inputs(batch, seq_len)
    lengths = jnp.full((batch,), seq_len, jnp.int32)
    scale = DK**-0.5
    prep = jax.jit(lambda q, k, g, beta: chunk_prep(q, k, g, beta, lengths, scale=scale, interpret=interpret))
    ours = jax.jit(lambda *a: chunk_prefill(*a, lengths, scale=scale, interpret=interpret))
    prepared = prep(q, k, g, beta)
    o_ref, s_ref = ours(q, k, v, g, beta, state)
    shape = f"B{batch}xT{seq_len}"
    rows = []
    if not interpret:
        rows.append({"shape": shape, "prep_call_us": 1e6 * time_jax_calls(prep, (q, k, g, beta)),
                     "chunk_prefill_call_us": 1e6 * time_jax_calls(ours, (q, k, v, g, beta, state))})
        print(json.dumps(rows[-1]), flush=True)
    for cfg in configs:
        scan = jax.jit(functools.partial(mosaic_scan, interpret=interpret, **cfg))
        try:
            o, s = scan(q, k, v, prepared, state)
        except Exception as e:  # a config that fails to compile on the GPU is a result, not the end of the run
            if interpret:
                raise
            rows.append({"shape": shape, "config": cfg, "error": f"{type(e).__name__}: {str(e)[:2000]}"})
            print(json.dumps(rows[-1]), flush=True)
            continue
        rows.append({"shape": shape, "config": cfg, "o_rel_vs_chunk_prefill": rel_err(o, o_ref),
                     "state_rel_vs_chunk_prefill": rel_err(s, s_ref), "state_moved_rel": rel_err(s, state)})
        if not interpret:
            rows[-1]["mosaic_scan_call_us"] = 1e6 * time_jax_calls(scan, (q, k, v, prepared, state))
        print(json.dumps(rows[-1]), flush=True)
        if interpret:  # the interpreter poisons outputs with NaN: an unwritten element fails here
            assert max(rows[-1]["o_rel_vs_chunk_prefill"], rows[-1]["state_rel_vs_chunk_prefill"]) < 1e-4, rows[-1]
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--check", action="store_true")
    parser.add_argument("--out", default=".")
    args = parser.parse_args()
    # 64-wide tiles with three stages would need 259 KiB of shared memory (227 available).
    configs = [{}, {"stages": 3}, {"block_v": 64}, {"off_chain": True}, {"block_v": 64, "off_chain": True}]
    if args.check:
        run(2, 192, configs, interpret=True)
        lowers_for_cuda(configs)
    else:
        result = {**run_info(), "rows": []}
        for batch, seq_len in [(1, 16384), (1, 4096), (8, 2048), (32, 1024)]:
            result["rows"] += run(batch, seq_len, configs, interpret=False)
            (pathlib.Path(args.out) / "mosaic_scan_probe.json").write_text(json.dumps(result, indent=1))
