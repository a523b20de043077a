"""Probe (eleventh session): the Mosaic GPU prep against the Triton prep, side by side on one GPU."""
import json, os, sys, pathlib, functools
import jax, jax.numpy as jnp
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from bench.kernels import gdr_inputs, time_jax_calls, rel_err, CHUNK_SHAPES, DK
from bench.run_info import run_info
from pallas_kernels.gated_delta_rule import chunk_gated_delta_rule_ref
from pallas_kernels.gated_delta_rule.chunk import chunk_prefill, chunk_prep, _gates_by_head
from pallas_kernels.gated_delta_rule.chunk_prep_mosaic import mosaic_chunk_prep

out = {**run_info(), "rows": []}
scale = DK**-0.5
def emit(**r):
    out["rows"].append(r); print(json.dumps(r), flush=True)
    pathlib.Path(os.environ.get("OUT", "/tmp"), "prep_probe.json").write_text(json.dumps(out, indent=1))

# ragged batch with NaN pads: both preps and the whole prefill against the fp32 reference
q, k, v, g, beta, state = gdr_inputs(4, 1000, seed=3)
lengths = jnp.array([1000, 640, 577, 1], jnp.int32)
valid = jnp.arange(1000)[None] < lengths[:, None]
nan = lambda x: jnp.where(valid.reshape(valid.shape + (1,) * (x.ndim - 2)), x, jnp.nan).astype(x.dtype)
qn, kn, vn, gn, bn = nan(q), nan(k), nan(v), nan(g), nan(beta)
for prep in ("triton", "mosaic"):
    for scan in ("triton", "mosaic"):
        o, s = chunk_prefill(qn, kn, vn, gn, bn, state, lengths, scale=scale, prep=prep, scan=scan)
        errs = []
        for b in range(4):
            L = int(lengths[b])
            ro, rs = chunk_gated_delta_rule_ref(q[b:b+1, :L], k[b:b+1, :L], v[b:b+1, :L], g[b:b+1, :L], beta[b:b+1, :L],
                                                initial_state=state[b:b+1], use_qk_l2norm=True, scale=scale)
            errs.append((rel_err(o[b:b+1, :L], ro), rel_err(s[b:b+1], rs)))
        emit(name=f"ragged nan pads prep={prep} scan={scan}", o_err=max(e[0] for e in errs),
             state_err=max(e[1] for e in errs), pad_o_nonzero=int(jnp.sum(jnp.where(valid[:, :, None, None], 0, jnp.abs(o.astype(jnp.float32)) > 0))))

for batch, seq_len in CHUNK_SHAPES:
    q, k, v, g, beta, state = gdr_inputs(batch, seq_len)
    lengths = jnp.full((batch,), seq_len, jnp.int32)
    tag = f"B{batch}xT{seq_len}"
    valid = jnp.ones((batch, seq_len), jnp.float32)
    tri = jax.jit(lambda q, k, g, b: chunk_prep(q, k, g, b, lengths, scale=scale))
    mos = jax.jit(lambda q, k, g, b: mosaic_chunk_prep(q, k, *_gates_by_head(g, b, valid), valid, scale=scale))
    a, m = tri(q, k, g, beta), mos(q, k, g, beta)
    errs = {n: rel_err(x, y) for n, x, y in zip(["T", "P", "G", "qf", "kf", "wf", "uf"], m, a)}
    emit(name=f"prep {tag} triton call", us=1e6 * time_jax_calls(tri, (q, k, g, beta)))
    emit(name=f"prep {tag} mosaic call", us=1e6 * time_jax_calls(mos, (q, k, g, beta)), rel_err_vs_triton=errs)
    res = {}
    for prep in ("triton", "mosaic"):
        call = jax.jit(lambda *x, prep=prep: chunk_prefill(*x, lengths, scale=scale, prep=prep))
        res[prep] = call(q, k, v, g, beta, state)
        emit(name=f"chunk {tag} prep={prep} call", us=1e6 * time_jax_calls(call, (q, k, v, g, beta, state)))
    emit(name=f"chunk {tag} mosaic vs triton prep", o=rel_err(res["mosaic"][0], res["triton"][0]),
         state=rel_err(res["mosaic"][1], res["triton"][1]))
