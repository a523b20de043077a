"""Probe (twelfth session): where the Mosaic GPU prep's time goes, by timing variants that leave one stage out.

No hardware counters are assumed: each variant is the kernel's source with one stage removed by a textual patch,
compiled as its own module, and timed on the same inputs. Outputs are reduced to one element each inside the jit so
that the host's per-output cost does not hide the device time. Writes $OUT/prep_ablation.json.
"""
import importlib.util, json, os, sys, pathlib, types
import jax, jax.numpy as jnp
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from bench.kernels import gdr_inputs, time_jax_calls, DK
from bench.run_info import run_info
from pallas_kernels.gated_delta_rule.chunk import chunk_prep, _gates_by_head
import pallas_kernels.gated_delta_rule.chunk_prep_mosaic as original

SOURCE = pathlib.Path(original.__file__).read_text()
PATCHES = {
    "full": [],
    "no_doubling (inverse = I - A)": [("doublings = chunk.bit_length() - 2", "doublings = 0")],
    "two_doublings": [("doublings = chunk.bit_length() - 2", "doublings = 2")],
    "first value head only": [("for head in range(group):", "for head in range(1):")],
    "no l2 norm pass": [("q_inv = normalise(q_s, scale)\n        k_inv = normalise(k_s, 1.0)",
                         "q_inv = k_inv = plgpu.layout_cast(jnp.ones((chunk,), f32), row_layout)")],
    "no output copies": [("plgpu.copy_smem_to_gmem(", "(lambda *a: None)(")],
    "no doubling, first head only, no copies": [("doublings = chunk.bit_length() - 2", "doublings = 0"),
                                                ("for head in range(group):", "for head in range(1):"),
                                                ("plgpu.copy_smem_to_gmem(", "(lambda *a: None)(")],
}
# Occupancy variants: T leaves from the inverse's buffer (one 8 KB buffer less), and the key products are formed
# per value head so that q k^T and k k^T are not live in registers across the other head's inverse.
T_FROM_INVERSE = [("inverse_s, t_out_s, p_out_s", "inverse_s, p_out_s"),
                  ("t_out_s[...] = inverse.astype(bf16)", "inverse_s[...] = inverse.astype(bf16)"),
                  ("plgpu.copy_smem_to_gmem(t_out_s,", "plgpu.copy_smem_to_gmem(inverse_s,"),
                  ("for _ in range(5)]", "for _ in range(4)]")]
KEY_PRODUCTS_PER_HEAD = [
    ("        qk, kk = pl.run_scoped(key_products, plgpu.ACC(square_shape, f32), plgpu.ACC(square_shape, f32))\n", ""),
    ("        for head in range(group):\n",
     "        for head in range(group):\n"
     "            qk, kk = pl.run_scoped(key_products, plgpu.ACC(square_shape, f32), plgpu.ACC(square_shape, f32))\n")]
PATCHES["T from the inverse's buffer"] = T_FROM_INVERSE
PATCHES["key products per head"] = KEY_PRODUCTS_PER_HEAD
PATCHES["T from the inverse's buffer, key products per head"] = T_FROM_INVERSE + KEY_PRODUCTS_PER_HEAD


def variant(name: str) -> types.ModuleType:
    source = SOURCE
    for old, new in PATCHES[name]:
        assert source.count(old) >= 1, (name, old)
        source = source.replace(old, new)
    module = types.ModuleType(f"prep_variant_{len(source)}")
    exec(compile(source, original.__file__, "exec"), module.__dict__)
    return module


def one_element_each(outputs):
    return sum(x.reshape(-1)[0].astype(jnp.float32) for x in outputs)


out = {**run_info(), "rows": []}
def emit(**r):
    out["rows"].append(r); print(json.dumps(r), flush=True)
    pathlib.Path(os.environ.get("OUT", "/tmp"), "prep_ablation.json").write_text(json.dumps(out, indent=1))

scale = DK**-0.5
for batch, seq_len in [(1, 16384), (32, 1024), (1, 4096)]:
    q, k, v, g, beta, state = gdr_inputs(batch, seq_len)
    lengths = jnp.full((batch,), seq_len, jnp.int32)
    valid = jnp.ones((batch, seq_len), jnp.float32)
    gcum, beta_h = jax.jit(_gates_by_head)(g, beta, valid)
    tag = f"B{batch}xT{seq_len}"
    tri = jax.jit(lambda q, k, g, b: one_element_each(chunk_prep(q, k, g, b, lengths, scale=scale)))
    emit(shape=tag, name="triton chunk_prep (gates inside)", us=1e6 * time_jax_calls(tri, (q, k, g, beta)))
    gates = jax.jit(lambda g, b: one_element_each(_gates_by_head(g, b, valid)))
    emit(shape=tag, name="XLA gates for the Mosaic prep", us=1e6 * time_jax_calls(gates, (g, beta)))
    for name in sys.argv[1:] or PATCHES:
        module = variant(name)
        mos = jax.jit(lambda *x, m=module: one_element_each(m.mosaic_chunk_prep(*x, scale=scale)))
        emit(shape=tag, name=f"mosaic kernel: {name}", us=1e6 * time_jax_calls(mos, (q, k, gcum, beta_h, valid)))
