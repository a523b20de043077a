"""Kernel benchmark on one GPU: ours (Pallas/Triton) vs FLA (eager and CUDA-graph) vs the XLA/pure-JAX paths.

    python bench/kernels.py [--quick] [--only decode,rotary,chunk] [--sweep chunk,rotary,decode] [--out DIR]

A full run takes more than the device tool's 10 minutes per command on an H100 (compiles of the unrolled
timing programs and the XLA references dominate): run it one section at a time with --only.

Prints a table and writes bench/results/kernels-<device>.json with every figure (rows not measured this time
are kept from the file's earlier runs on the same device; each row names its commit); the rows a run measures
again move to bench/results/history/kernels-<device>.json, so the main file holds current figures only.
Each row gives the time, the achieved GB/s over the bytes that must move (inputs read once, outputs and
state written once) against the copy bandwidth measured in the same run, and the floor
max(bytes / copy GB/s, FLOPs / measured bf16 rate). Our kernels are timed two ways: `loop` = device time
per call from many calls unrolled inside one jit (no dispatch), `call` = back-to-back jitted calls (what a
caller pays, dispatch included; a state that is not donated is copied first, because the kernels update it
in place).
FLA is timed eagerly (triton do_bench, launch overhead included) and as a replayed torch.cuda.CUDAGraph.
When importable, FlashQLA (QwenLM's TileLang Hopper kernels: warp-specialised, with intra-card sequence
parallelism; the fastest public GDN prefill we know of) is timed the same way in the chunk section, as a
second anchor. Neither is on the device machine: bench/carry_flashqla.sh packs FlashQLA for carrying.
"""

from __future__ import annotations

import argparse
import functools
import importlib.metadata
import json
import os
import pathlib
import statistics
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch and JAX share the GPU here

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402

# Run as a script, the repo root replaces the script's directory: bench/kernels.py would shadow the `kernels`
# package that transformers imports.
if sys.path[0] == str(pathlib.Path(__file__).resolve().parent):
    sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])
from bench.run_info import run_info  # noqa: E402
from pallas_kernels.gated_delta_rule import chunk_gated_delta_rule_ref, recurrent_gated_delta_rule_ref  # noqa: E402
from pallas_kernels.gated_delta_rule.chunk import chunk_prefill, chunk_prep  # noqa: E402
from pallas_kernels.gated_delta_rule.recurrent import recurrent_decode  # noqa: E402
from pallas_kernels.vision_rotary import apply_vision_rotary_pallas, apply_vision_rotary_ref, vision_rotary_tables  # noqa: E402

HK, HV, DK, DV = 16, 32, 128, 128
CHUNK_SHAPES = [(1, 512), (1, 4096), (1, 16384), (8, 2048), (32, 1024)]
DECODE_BATCHES = [1, 8, 64, 256]
ROTARY_SHAPES = [(4096, 16, 80), (16384, 16, 80), (16384, 16, 72)]


# ----------------------------------------------------------------------------------------------- timing
def time_jax_loop(step, carry, consts, iters: int, reps: int = 7, tie_inputs: bool = False) -> float:
    """Seconds per step: chained steps step(carry, *consts) unrolled in one compiled program (an XLA while
    loop costs ~10 us per trip on this GPU, more than a small kernel), timed with `iters` and 2 x `iters`
    steps; the difference over `iters` removes the program's fixed cost (launch, sync: tens of microseconds,
    which divided by 20 steps once read as 5 us of a 6 us decode step). Medians over reps. The inputs are
    arguments, not closed-over constants, so they are not baked into the program. tie_inputs passes them
    through an optimization barrier with the carry at every step: needed when a kernel of the step reads
    only loop-invariant inputs (the chunked prep), which XLA would otherwise compute once for all steps."""

    def body(c, xs):
        if tie_inputs:
            c, xs = lax.optimization_barrier((c, xs))
        return step(c, *xs)

    programs = {
        n: jax.jit(lambda c, *xs, n=n: lax.fori_loop(0, n, lambda i, c: body(c, xs), c, unroll=True), donate_argnums=0)
        for n in (iters, 2 * iters)
    }
    times = {n: [] for n in programs}
    for rep in range(reps + 1):  # interleaved, so clock or thermal drift cannot land on one of the two
        for n, run in programs.items():
            t0 = time.perf_counter()
            carry = jax.block_until_ready(run(carry, *consts))
            if rep:  # the first round compiles and warms up
                times[n].append(time.perf_counter() - t0)
    return (statistics.median(times[2 * iters]) - statistics.median(times[iters])) / iters


def time_jax_calls(fn, args, calls: int = 50, reps: int = 5, threaded: tuple[int, int] | None = None) -> float:
    """Seconds per call of a jitted fn dispatched back to back (dispatch included), median over reps.
    threaded=(i, j): fn donates argument i, and each call passes the previous call's output j in its place."""
    args = list(args)

    def call():
        out = fn(*args)
        if threaded is not None:
            args[threaded[0]] = out[threaded[1]]
        return out

    jax.block_until_ready(call())
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(calls):
            out = call()
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / calls)
    return statistics.median(times)


def time_torch(fn) -> tuple[float, float]:
    """(eager, CUDA-graph replay) seconds per call, medians from triton's event-timed do_bench."""
    import torch
    from triton.testing import do_bench

    eager = do_bench(fn, warmup=50, rep=300, return_mode="median") * 1e-3
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graphed = do_bench(graph.replay, warmup=50, rep=300, return_mode="median") * 1e-3
    return eager, graphed


# ----------------------------------------------------------------------------------------------- ceilings
def measure_ceilings() -> dict:
    import torch
    from triton.testing import do_bench

    x = torch.empty(2**30, dtype=torch.uint8, device="cuda").random_()
    y = torch.empty_like(x)
    copy_s = do_bench(lambda: y.copy_(x), warmup=50, rep=300, return_mode="median") * 1e-3
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    mm_s = do_bench(lambda: a @ b, warmup=50, rep=300, return_mode="median") * 1e-3
    del x, y, a, b
    torch.cuda.empty_cache()
    return {"copy_GBps": 2 * 2**30 / copy_s / 1e9, "bf16_matmul_TFLOPs": 2 * 8192**3 / mm_s / 1e12,
            "l2_bytes": torch.cuda.get_device_properties(0).L2_cache_size}


def row(name, seconds, nbytes, flops, ceilings, **extra) -> dict:
    floor = max(nbytes / (ceilings["copy_GBps"] * 1e9), flops / (ceilings["bf16_matmul_TFLOPs"] * 1e12))
    return {
        "name": name, "us": seconds * 1e6, "GBps": nbytes / seconds / 1e9,
        "pct_copy_bw": 100 * nbytes / seconds / 1e9 / ceilings["copy_GBps"],
        "floor_us": floor * 1e6, "x_floor": seconds / floor, "bytes": nbytes, "flops": flops, **extra,
    }


# ----------------------------------------------------------------------------------------------- inputs
def gdr_inputs(batch, seq_len, seed=0, num_k_heads=HK, num_v_heads=HV):
    ks = jax.random.split(jax.random.key(seed), 6)
    bf = jnp.bfloat16
    hk, hv = num_k_heads, num_v_heads
    q = jax.random.normal(ks[0], (batch, seq_len, hk, DK), bf)
    k = jax.random.normal(ks[1], (batch, seq_len, hk, DK), bf)
    v = jax.random.normal(ks[2], (batch, seq_len, hv, DV), bf)
    g = -jnp.exp(0.3 * jax.random.normal(ks[3], (hv,))) * jax.nn.softplus(jax.random.normal(ks[4], (batch, seq_len, hv)))
    beta = jax.nn.sigmoid(jax.random.normal(ks[5], (batch, seq_len, hv))).astype(bf)
    state = 0.1 * jax.random.normal(jax.random.fold_in(ks[5], 1), (batch, hv, DK, DV), jnp.float32)
    return q, k, v, g, beta, state


def gdr_bytes(batch, seq_len) -> int:
    tokens = batch * seq_len
    qkv = tokens * (2 * HK * DK + HV * DV) * 2
    gates = tokens * HV * (4 + 2)
    out = tokens * HV * DV * 2
    state = 2 * batch * HV * DK * DV * 4
    return qkv + gates + out + state


def chunk_flops(batch, seq_len, c=64, num_v_heads=HV, dk=DK, dv=DV) -> int:
    """FLOPs of the chunked algorithm (per chunk and value head: q k^T, k k^T, the triangular solve applied to
    [k, v], W S, q S, scores v_new, k^T v_new), the least a chunked kernel must do."""
    per_chunk = 2 * (2 * c * c * dk + c * c * (dk + dv) + 3 * c * dk * dv + c * c * dv)
    return batch * num_v_heads * -(-seq_len // c) * per_chunk


def chunk_loop_seconds(cfg: dict, inputs, lengths, iters: int = 5) -> float:
    """Device seconds per chunk_prefill call with `cfg` (the `loop` timing): chained calls threading the state."""
    q, k, v, g, beta, state = inputs
    seq_len = q.shape[1]

    def step(carry, q, k, v, g, beta):
        s, acc = carry
        o, s = chunk_prefill(q, k, v, g, beta, s, lengths, scale=DK**-0.5, **cfg)
        # A strided sum keeps every output live (XLA would drop unused ones) at ~1% extra bytes.
        return s, acc + o[:, :: max(1, seq_len // 8)].astype(jnp.float32).sum()

    return time_jax_loop(step, (jnp.array(state), jnp.float32(0)), (q, k, v, g, beta), iters, tie_inputs=True)


def to_torch(*xs):
    import torch

    return [torch.from_dlpack(jax.block_until_ready(x)) for x in xs]


# ----------------------------------------------------------------------------------------------- benches
def import_flashqla():
    """FlashQLA's chunk_gated_delta_rule, or None (with the reason printed) where it cannot load."""
    try:
        from flash_qla import chunk_gated_delta_rule
    except (ImportError, OSError, ValueError) as err:  # TileLang raises ValueError on GPUs it does not target
        print(f"FlashQLA not timed: {type(err).__name__}: {err}", flush=True)
        return None
    return chunk_gated_delta_rule


def bench_chunk(ceilings, shapes, configs, rows: list[dict], save) -> None:
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_chunk

    flashqla_chunk = import_flashqla()
    # FLA 0.6 hands chunk_gated_delta_rule to FlashQLA whenever that is installed (read at each call): the fla
    # rows are FLA's own Triton kernels only with its FlashQLA backend off.
    os.environ["FLA_FLASH_QLA"] = "0"

    for batch, seq_len in shapes:
        q, k, v, g, beta, state = gdr_inputs(batch, seq_len)
        nbytes, flops = gdr_bytes(batch, seq_len), chunk_flops(batch, seq_len)
        lengths = jnp.full((batch,), seq_len, jnp.int32)
        scale = DK**-0.5
        tag = f"B{batch}xT{seq_len}"
        best = None
        for cfg in configs:
            t = chunk_loop_seconds(cfg, (q, k, v, g, beta, state), lengths, 5 if seq_len * batch > 8192 else 20)
            rows.append(row(f"chunk {tag} ours loop", t, nbytes, flops, ceilings, config=cfg))
            if best is None or t < best[0]:
                best = (t, cfg, rows[-1])
        best[2]["best"] = True
        call = jax.jit(lambda *a, cfg=best[1]: chunk_prefill(*a, lengths, scale=scale, **cfg))
        rows.append(row(f"chunk {tag} ours call", time_jax_calls(call, (q, k, v, g, beta, state)), nbytes, flops,
                        ceilings, config=best[1]))
        prep = jax.jit(lambda *a, c=best[1]: chunk_prep(*a, lengths, scale=scale, num_warps=c.get("prep_warps", 2),
                                                        heads_per_program=c.get("prep_heads")))
        rows.append(row(f"chunk {tag} ours prep-only call", time_jax_calls(prep, (q, k, g, beta)), nbytes, flops,
                        ceilings))
        ref = jax.jit(lambda *a: chunk_gated_delta_rule_ref(*a[:5], initial_state=a[5]))
        rows.append(row(f"chunk {tag} xla-ref call", time_jax_calls(ref, (q, k, v, g, beta, state), calls=5), nbytes,
                        flops, ceilings))
        tq, tk, tv, tg, tb, ts = to_torch(q, k, v, g, beta, state)
        # Same inputs, so the outputs must agree to bf16 accuracy: guards against timing a broken kernel.
        o_ours, s_ours = chunk_prefill(q, k, v, g, beta, state, lengths, scale=scale, **best[1])
        anchors = {"fla": fla_chunk} if flashqla_chunk is None else {"fla": fla_chunk, "flashqla": flashqla_chunk}
        for anchor, chunk_fn in anchors.items():
            call = functools.partial(chunk_fn, tq, tk, tv, tg, tb, scale=scale, initial_state=ts,
                                     output_final_state=True, use_qk_l2norm_in_kernel=True)
            eager, graphed = time_torch(call)
            rows.append(row(f"chunk {tag} {anchor} eager", eager, nbytes, flops, ceilings))
            rows.append(row(f"chunk {tag} {anchor} graph", graphed, nbytes, flops, ceilings))
            o_theirs, s_theirs = call()
            rows[-1][f"rel_err_vs_{anchor}_o"] = torch_rel(o_ours, o_theirs)
            rows[-1][f"rel_err_vs_{anchor}_state"] = torch_rel(s_ours, s_theirs)
        print_rows(rows[-3 - 2 * len(anchors) - len(configs):])
        save()  # after each shape: a run cut off by its time limit keeps what it measured


def rel_err(out, ref) -> float:
    """||out - ref|| / ||ref||, in float64 (NaN where out holds a NaN)."""
    a, b = (np.asarray(jnp.asarray(x, jnp.float32), np.float64) for x in (out, ref))
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def torch_rel(ours, theirs) -> float:
    return rel_err(ours, theirs.float().cpu().numpy())


def bench_decode(ceilings, batches, configs, rows: list[dict], save) -> None:
    from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule as fla_recurrent

    for batch in batches:
        q, k, v, g, beta, state = gdr_inputs(batch, 1, seed=batch)
        nbytes = gdr_bytes(batch, 1)
        flops = batch * HV * DK * DV * 8
        lengths = jnp.ones((batch,), jnp.int32)
        scale = DK**-0.5
        tag = f"B{batch}"
        args = [q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0]]
        best = None
        for cfg in configs:
            def step(carry, q, k, v, g, beta, cfg=cfg):
                # The kernel is one custom call writing o and the state, so o needs no consumer to stay live.
                o, s = recurrent_decode(q, k, v, g, beta, carry[1], lengths, scale=scale, **cfg)
                return o, s
            # Small batches step in a few microseconds: 20 steps left the slope inside the programs' jitter
            # (B1 read -5.3 us on an H200), so they take more.
            iters = 100 if batch <= 8 else 20
            t = time_jax_loop(step, (jnp.zeros_like(v[:, 0]), jnp.array(state)), args, iters=iters)
            rows.append(row(f"decode {tag} ours loop", t, nbytes, flops, ceilings, config=cfg))
            if best is None or t < best[0]:
                best = (t, cfg, rows[-1])
        best[2]["best"] = True
        call = jax.jit(
            lambda q, k, v, g, b, s, cfg=best[1]: recurrent_decode(q, k, v, g, b, s, lengths, scale=scale, **cfg),
            donate_argnums=5,
        )
        t = time_jax_calls(call, (*args, jnp.array(state)), calls=100, threaded=(5, 1))
        rows.append(row(f"decode {tag} ours call", t, nbytes, flops, ceilings, config=best[1]))

        def xla_step(carry, q, k, v, g, beta):  # the sum keeps XLA from dropping the o computation
            s, acc = carry
            o, s = recurrent_gated_delta_rule_ref(q, k, v, g, beta, initial_state=s)
            return s, acc + o.astype(jnp.float32).sum()
        t = time_jax_loop(xla_step, (jnp.array(state), jnp.float32(0)), (q, k, v, g, beta), 20)
        rows.append(row(f"decode {tag} xla loop", t, nbytes, flops, ceilings))
        tq, tk, tv, tg, tb, ts = to_torch(q, k, v, g, beta, state)
        fla = lambda: fla_recurrent(tq, tk, tv, g=tg, beta=tb, scale=scale, initial_state=ts,
                                    output_final_state=True, use_qk_l2norm_in_kernel=True)
        eager, graphed = time_torch(fla)
        rows.append(row(f"decode {tag} fla eager", eager, nbytes, flops, ceilings))
        rows.append(row(f"decode {tag} fla graph", graphed, nbytes, flops, ceilings))
        o_ours, s_ours = recurrent_decode(*args, jnp.array(state), lengths, scale=scale, **best[1])
        o_fla, s_fla = fla()
        rows[-1]["rel_err_vs_fla_o"] = torch_rel(o_ours[:, None], o_fla)
        rows[-1]["rel_err_vs_fla_state"] = torch_rel(s_ours, s_fla)
        print_rows(rows[-4 - len(configs):])
        save()  # after each shape: a run cut off by its time limit keeps what it measured


def bench_rotary(ceilings, shapes, configs, rows: list[dict], save) -> None:
    for num_tokens, num_heads, head_dim in shapes:
        rng = np.random.default_rng(num_tokens)
        q = jnp.asarray(rng.standard_normal((num_tokens, num_heads, head_dim)), jnp.bfloat16)
        k = jnp.asarray(rng.standard_normal((num_tokens, num_heads, head_dim)), jnp.bfloat16)
        side = int(np.sqrt(num_tokens)) + 1
        pos_hw = jnp.asarray(np.stack(np.divmod(np.arange(num_tokens), side), -1), jnp.int32)
        cos, sin = vision_rotary_tables(head_dim, side)
        nbytes = 4 * q.size * 2 + pos_hw.size * 4
        flops = 6 * 2 * q.size
        tag = f"N{num_tokens}xH{num_heads}xD{head_dim}"
        best = None
        tables = (pos_hw, cos, sin)
        # Consecutive steps rotate different (q, k) copies, together at least twice the L2 size: one pair
        # rotated over and over would stay in L2 (N4096 x D80 is 21 MB) and read as > 100% of HBM copy.
        copies = -(-2 * ceilings["l2_bytes"] // (2 * q.nbytes))

        def pairs():  # fresh buffers for each timing: the loop donates its carry
            return tuple((jnp.array(q), jnp.array(k)) for _ in range(copies))

        def cycled(rotate):
            return lambda pairs, *t: (*pairs[1:], rotate(*pairs[0], *t))

        for cfg in configs:
            step = cycled(functools.partial(apply_vision_rotary_pallas, **cfg))
            t = time_jax_loop(step, pairs(), tables, 30)
            rows.append(row(f"rotary {tag} ours loop", t, nbytes, flops, ceilings, config=cfg, copies=copies))
            if best is None or t < best[0]:
                best = (t, cfg, rows[-1])
        best[2]["best"] = True
        t = time_jax_loop(cycled(apply_vision_rotary_ref), pairs(), tables, 30)
        rows.append(row(f"rotary {tag} xla loop", t, nbytes, flops, ceilings, copies=copies))
        print_rows(rows[-1 - len(configs):])
        save()  # after each shape: a run cut off by its time limit keeps what it measured


def print_rows(rows):
    for r in rows:
        cfg = r.get("config", "")
        print(f"{r['name']:<34} {r['us']:>10.1f} us {r['GBps']:>8.0f} GB/s {r['pct_copy_bw']:>5.0f}% copy  "
              f"floor {r['floor_us']:>8.1f} us  x{r['x_floor']:>6.2f}  {cfg}", flush=True)


def merge_results(previous: dict, history: dict, result: dict, this_run: dict,
                  rows: list[dict]) -> tuple[dict, dict | None]:
    """(the results file, its history file or None when there is nothing to move) after this run's `rows`.

    The results file holds current figures only: every row's latest measurement (rows this run did not measure
    keep theirs, each with its commit) and the runs (`runs`: sections, commit, date, ceilings) those rows come
    from. Rows measured again and runs no current row comes from move to the history file (`rows_superseded`,
    `runs`), appended to what it held."""
    names = {r["name"] for r in rows}
    earlier = previous.get("rows", [])
    current = dict(result, rows=[*(r for r in earlier if r["name"] not in names),
                                 *(dict(r, commit=result["commit"]) for r in rows)])
    live = {r["commit"] for r in current["rows"]}
    runs = [*previous.get("runs", []), this_run]
    current["runs"] = [run for run in runs if run is this_run or run["commit"] in live]
    superseded = [r for r in earlier if r["name"] in names]
    retired = [run for run in runs if run is not this_run and run["commit"] not in live]
    if not (superseded or retired):
        return current, None
    past = dict(history, device=result["device"],
                what="Rows bench/kernels.py measured again later (rows_superseded) and the runs they came from; "
                     "the current rows are in the file of the same name one directory up.",
                rows_superseded=[*history.get("rows_superseded", []), *superseded],
                runs=[*history.get("runs", []), *retired])
    return current, past


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="one shape per section, no sweep")
    parser.add_argument("--sweep", default="", help="sections (chunk,decode,rotary) to try tile configurations in")
    parser.add_argument("--only", default="decode,rotary,chunk")
    parser.add_argument("--batches", default="", help="decode batch sizes, comma-separated (default: all)")
    parser.add_argument("--chunk-shapes", default="", help="chunk B x T, e.g. 1x16384,8x2048 (default: all)")
    parser.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results"))
    args = parser.parse_args()

    device = jax.devices()[0]
    ceilings = measure_ceilings()
    print(f"{device.device_kind}  jax {jax.__version__}  copy {ceilings['copy_GBps']:.0f} GB/s  "
          f"bf16 mm {ceilings['bf16_matmul_TFLOPs']:.0f} TFLOP/s", flush=True)
    # {} = the kernels' defaults; the sweeps keep what measured close in earlier runs (see NOTES.md).
    chunk_cfgs, decode_cfgs, rotary_cfgs = [{}], [{}], [{}]
    if "chunk" in args.sweep:
        chunk_cfgs += [dict(prep_heads=1), dict(prep_warps=4)]
    if "decode" in args.sweep:
        decode_cfgs += [dict(block_v=32), dict(block_v=128), dict(num_warps=2), dict(num_warps=8),
                        dict(block_v=128, num_warps=8)]
    if "rotary" in args.sweep:
        rotary_cfgs += [dict(block_elems=1024), dict(block_elems=4096), dict(num_warps=8)]
    result = {
        **run_info(),
        "shapes": {"Hk": HK, "Hv": HV, "Dk": DK, "Dv": DV, "dtype": "bf16 in, fp32 state"},
        "ceilings": ceilings, "rows": [],
    }
    try:
        import fla
        import torch
        result["fla"], result["torch"] = fla.__version__, torch.__version__
    except ImportError:
        pass
    try:
        result["flash_qla"] = importlib.metadata.version("flash-qla")
    except importlib.metadata.PackageNotFoundError:
        pass
    out_dir = pathlib.Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = f"kernels-{device.device_kind.replace(' ', '_')}.json"
    path, history_path = out_dir / name, out_dir / "history" / name
    # Sections are run one device call at a time: rows from earlier runs on this device that this run does not
    # measure again stay, each with its commit. What this run replaces goes to history/ (merge_results).
    previous = json.loads(path.read_text()) if path.exists() else {}
    if previous.get("device") != result["device"]:
        previous = {}
    history = json.loads(history_path.read_text()) if history_path.exists() else {}
    this_run = {"sections": args.only.split(","), "commit": result["commit"], "date": result["date"],
                "ceilings": ceilings}
    rows: list[dict] = []  # this run's
    decode_batches = DECODE_BATCHES[1:3] if args.quick else DECODE_BATCHES
    if args.batches:
        decode_batches = [int(b) for b in args.batches.split(",")]
    chunk_shapes = CHUNK_SHAPES[1:2] if args.quick else CHUNK_SHAPES
    if args.chunk_shapes:
        chunk_shapes = [tuple(int(n) for n in shape.split("x")) for shape in args.chunk_shapes.split(",")]

    def save():
        current, past = merge_results(previous, history, result, this_run, rows)
        path.write_text(json.dumps(current, indent=1))
        if past is not None:
            history_path.parent.mkdir(exist_ok=True)
            history_path.write_text(json.dumps(past, indent=1))

    sections = {
        "decode": lambda: bench_decode(ceilings, decode_batches, decode_cfgs,
                                       rows, save),
        "rotary": lambda: bench_rotary(ceilings, ROTARY_SHAPES[1:2] if args.quick else ROTARY_SHAPES, rotary_cfgs,
                                       rows, save),
        "chunk": lambda: bench_chunk(ceilings, chunk_shapes, chunk_cfgs, rows, save),
    }
    for section in this_run["sections"]:
        sections[section]()
    print("\nsummary")
    print_rows([r for r in rows if r.get("best") or not r["name"].endswith("ours loop")])
    save()
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
