"""Probe: decode-shaped matmuls, XLA's dot vs pallas_kernels.skinny_matmul, GB/s and % of copy."""
import json, os, sys, time, itertools
sys.path.insert(0, os.getcwd())
import jax, jax.numpy as jnp, numpy as np
from bench.models import copy_bandwidth
from pallas_kernels.skinny_matmul import Tiling, default_tiling, skinny_matmul_pallas, tiling_error

SHAPES = [(4096, 12288), (12288, 4096), (4096, 4096), (4096, 1024), (4096, 151936), (18944, 3584)]
out = os.environ.get("OUT", "/tmp")
copy = copy_bandwidth()
print(f"copy {copy/1e9:.0f} GB/s", flush=True)
rows = []

def timeit(f, *a, n=10):
    jax.block_until_ready(f(*a))
    ts = []
    for _ in range(n):
        t = time.perf_counter(); jax.block_until_ready(f(*a)); ts.append(time.perf_counter() - t)
    return float(np.median(ts))

for k, n in SHAPES:
    layers = max(2, int(3e9 // (k * n * 2)))
    ws = [jax.random.normal(jax.random.key(i), (k, n), jnp.bfloat16) * 0.02 for i in range(layers)]
    nbytes = layers * k * n * 2
    def run(mm):
        @jax.jit
        def f(x, ws):
            acc = None
            for w in ws:
                y = mm(x, w)
                acc = y if acc is None else acc + y
                x = x + acc[:, :1].astype(x.dtype) * 0  # serial dependency as in a model
            return acc
        return f
    for m in (1, 8, 16):
        x = jax.random.normal(jax.random.key(99), (m, k), jnp.bfloat16)
        t = timeit(run(jnp.dot), x, ws)
        r = dict(k=k, n=n, m=m, impl="xla", ms_per_matmul=t / layers * 1e3, pct_copy=nbytes / t / copy * 100)
        rows.append(r); print(r, flush=True)
    d = default_tiling(k, n)
    cands = {d, Tiling(d.block_n, d.block_k, d.splits, 4, 3), Tiling(d.block_n, d.block_k, d.splits, 4, 6), Tiling(d.block_n, d.block_k, d.splits, 8, 4)}
    for bn, bk, s, st in itertools.product((64, 128), (128,), (1, 2, 4, 8, 16), (4,)):
        progs = n // bn * s if n % bn == 0 else 0
        if 132 <= progs <= 8192:
            cands.add(Tiling(bn, bk, s, 4, st))
    x1 = jax.random.normal(jax.random.key(99), (1, k), jnp.bfloat16)
    x8 = jax.random.normal(jax.random.key(99), (8, k), jnp.bfloat16)
    ref = jnp.dot(x8, ws[0], preferred_element_type=jnp.float32)
    best = None
    for t_ in sorted(cands, key=str):
        if t_ is None or tiling_error(t_, 8, k, n):
            continue
        try:
            y = skinny_matmul_pallas(x8, ws[0], tiling=t_)
            err = float(jnp.max(jnp.abs(y.astype(jnp.float32) - ref)) / jnp.max(jnp.abs(ref)))
            f = run(lambda x, w: skinny_matmul_pallas(x, w, tiling=t_))
            tm1 = timeit(f, x1, ws); tm8 = timeit(f, x8, ws)
        except Exception as e:  # noqa
            print("fail", t_, repr(e)[:200], flush=True); continue
        r = dict(k=k, n=n, impl="pallas", tiling=str(t_), default=t_ == default_tiling(k, n), err=err,
                 ms1=tm1 / layers * 1e3, pct1=nbytes / tm1 / copy * 100, pct8=nbytes / tm8 / copy * 100)
        rows.append(r)
        if best is None or r["pct1"] > best["pct1"]:
            best = r
        if r["default"]:
            print("default", r, flush=True)
    print("best", best, flush=True)
    del ws
json.dump(dict(device=jax.devices()[0].device_kind, copy=copy, rows=rows), open(f"{out}/skinny_probe.json", "w"), indent=1)
