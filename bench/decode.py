"""Decode speed against the memory roofline, on real released architectures with random bf16 weights.

    python bench/decode.py [--models qwen3_5-9b,qwen3_vl-8b,qwen2_5_vl-7b,qwen3_5-35b-a3b]
                           [--cases 1x1024,8x1024,32x1024,64x1024,1x32768,8x32768] [--calls 8] [--steps 16]
                           [--hf 1x1024,8x1024] [--e2e] [--fp8] [--tiny]

Per model (bench/configs/NAME.json, the decoder alone: no vision weights) and case BATCHxCONTEXT: the engine's
compiled decode program (``--steps`` tokens per call) runs on a state holding BATCH requests of CONTEXT tokens
(KV cache and Gated DeltaNet state filled with non-zero values: no prefill is needed to decode at 32K), called
back to back as the engine's host loop does (the next call dispatched before the previous call's tokens are
read). Reported: tok/s; the roofline, the bytes a step must move over the copy bandwidth measured in this run
(every weight read once, MoE: the routed experts' weights only, expected distinct experts under uniform
routing; Gated DeltaNet conv and recurrent state read and written per row; KV read up to each row's mean
length); the % of it reached; the call's isolated time (one call, synchronised) beside the loop's, whose
difference is host time the loop did not hide; and the weight copies in the compiled program (must be none).
``--profile`` adds each case's GPU kernel time per step by kernel name (jax.profiler) and writes the compiled
decode program's HLO (decode-hlo-MODEL-BxC.txt beside the JSON) to map those names to ops. ``--hf`` times HF
transformers' ``generate`` on the same GPU for those cases (torch, random weights, same config;
decode tok/s from a 1-token and a 33-token run). ``--e2e`` also runs batch 1 at the first case's context through
``Engine.run`` with a real prefill, plain and streamed (time to first token, decode tok/s and the gaps between
token events as a user sees them). ``--tiny`` runs a
tiny config of each family on the CPU to check the script.

Prints a table and writes bench/results/decode-<device>.json (device, jax version, commit, date, every figure).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch and JAX may share the GPU

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

# Run as a script, the repo root replaces the script's directory: bench/kernels.py would shadow the `kernels`
# package that transformers imports.
if sys.path[0] == str(pathlib.Path(__file__).resolve().parent):
    sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])
from bench.hlo import materialised_weights, weight_shapes  # noqa: E402
from bench.models import (  # noqa: E402
    bench_config, copy_bandwidth, profiled_kernel_seconds, random_params, random_text_request, text_only,
)
from bench.run_info import run_info, write_result  # noqa: E402
from convert.converter import with_fp8_quantization  # noqa: E402
from qwenvl_jax.cache import DecodeState, tree_bytes  # noqa: E402
from qwenvl_jax.config import ModelConfig, parse_config  # noqa: E402
from qwenvl_jax.engine import Engine, EngineConfig  # noqa: E402
from qwenvl_jax.models.model import abstract_model  # noqa: E402

DEFAULT_MODELS = "qwen3_5-9b,qwen3_vl-8b,qwen2_5_vl-7b,qwen3_5-35b-a3b"
# 1x1024@131072: the 1K-token slot again in an engine sized for 128K tokens (its cost must not follow max_len).
DEFAULT_CASES = "1x1024,8x1024,32x1024,64x1024,1x1024@131072,1x32768,8x32768"


def parse_cases(text: str) -> list[tuple[int, int, int | None]]:
    """BATCHxCONTEXT[@MAX_LEN] cases: (batch, context, the engine's max_len or None for context + a margin)."""
    cases = []
    for case in filter(None, text.split(",")):
        shape, _, max_len = case.partition("@")
        batch, context = (int(x) for x in shape.split("x"))
        cases.append((batch, context, int(max_len) if max_len else None))
    return cases


# ------------------------------------------------------------------------------------------- bytes per step


def step_bytes(cfg: ModelConfig, params, batch: int, mean_context: float) -> dict:
    """Bytes one decode step must move: weights once (MoE: expected distinct routed experts), Gated DeltaNet
    state read and written per row, KV read up to the mean context per row."""
    text = cfg.text
    lm = params["language_model"]
    # An untied embedding table is read one row per token; a tied one is the LM head, read whole.
    head = tree_bytes(params["lm_head"]) if "lm_head" in params else tree_bytes(lm["embed_tokens"])
    weights = tree_bytes(lm["layers"]) + tree_bytes(lm["norm"]) + head
    experts = 0
    if text.num_experts:
        all_experts = sum(x.size * x.dtype.itemsize for path, x in jax.tree_util.tree_leaves_with_path(lm["layers"])
                        if "'experts'" in jax.tree_util.keystr(path))
        # Expected distinct experts per layer when each of `batch` tokens picks k of E uniformly.
        e, k = text.num_experts, text.num_experts_per_tok
        touched = e * (1 - (1 - k / e) ** batch)
        experts = all_experts * touched / e
        weights = weights - all_experts + experts
    kinds = text.layer_types
    gdn_layers, attn_layers = kinds.count("linear_attention"), kinds.count("full_attention")
    gdn = 0
    if gdn_layers:
        recurrent = text.linear_num_value_heads * text.linear_key_head_dim * text.linear_value_head_dim * 4
        conv = (text.linear_conv_kernel_dim - 1) * text.gdn_conv_dim * 2
        gdn = 2 * gdn_layers * batch * (recurrent + conv)
    kv = attn_layers * batch * mean_context * 2 * text.num_key_value_heads * text.head_dim * 2
    return dict(weights=weights, routed_experts=experts, gdn_state=gdn, kv=kv, total=weights + gdn + kv)


# ------------------------------------------------------------------------------------------- synthetic state


def _pattern(shape: tuple[int, ...], dtype, seed: int, scale: float) -> jax.Array:
    """Non-zero, varied values made in one fused elementwise pass (no random-bit buffers at 40 GB of cache)."""
    x = jnp.zeros(shape, jnp.float32) + seed
    for axis, size in enumerate(shape):
        x = x + jax.lax.broadcasted_iota(jnp.float32, shape, axis) * (0.618 + axis) / size * 97.0
    return (scale * jnp.sin(x)).astype(dtype)


@functools.partial(jax.jit, donate_argnums=0, static_argnames="batch")
def synthetic_state(state: DecodeState, next_token_b: jax.Array, context: int, *, batch: int) -> DecodeState:
    """``batch`` requests of ``context`` tokens in slots [0, batch): caches filled in place (donated), lengths set,
    the requests active and never stopping on their own."""
    layers = jax.tree_util.tree_map(lambda x: _pattern(x.shape, x.dtype, 1, 0.5 if x.dtype != jnp.float32 else 0.02),
                                    state.layers)
    real = jnp.arange(state.lengths.shape[0]) < batch
    return state._replace(
        layers=layers,
        lengths=jnp.where(real, context, 0).astype(jnp.int32),
        active=real,
        remaining=jnp.where(real, 1 << 30, 0).astype(jnp.int32),
        next_token=state.next_token.at[:batch].set(next_token_b),
    )


# ------------------------------------------------------------------------------------------- timing


def time_decode(engine: Engine, batch: int, context: int, calls: int, profile: bool = False,
                hlo_path: pathlib.Path | None = None) -> dict:
    """The compiled decode program on a synthetic state: its weight copies, one isolated call, and ``calls``
    calls back to back the way ``Engine.run`` drives them. ``profile``: then two calls under jax.profiler, GPU
    kernel time per decode step by kernel name (every kernel, the largest first) and in all."""
    cfg = engine.config
    rng = np.random.default_rng(batch * 7 + context)
    tokens = rng.integers(0, engine.vocab_size, batch).astype(np.int32)
    # Back onto the state's own shardings (on a mesh the filled state comes out replicated; one device: no-op).
    shardings = jax.tree_util.tree_map(lambda x: x.sharding, engine.state)
    engine.state = jax.device_put(synthetic_state(engine.state, tokens, context, batch=batch), shardings)
    host_active = np.zeros(cfg.max_batch + 1, bool)
    host_active[:batch] = True
    rows = min(b for b in cfg.decode_buckets if b >= batch)
    t0 = time.perf_counter()
    num_steps = np.int32(cfg.decode_steps)
    decode = engine._decode.lower(engine._weights, engine.state, host_active, engine._eos, num_steps,
                                  steps=cfg.decode_steps, rows=rows).compile()
    compile_s = time.perf_counter() - t0
    hlo = decode.as_text()
    if hlo_path is not None:  # maps the profile's kernel names (fusion names) back to the ops they run
        hlo_path.parent.mkdir(parents=True, exist_ok=True)
        hlo_path.write_text(hlo)
    copies = materialised_weights(hlo, weight_shapes(engine.params))

    def call():
        engine.state, out = decode(engine._weights, engine.state, host_active, engine._eos, num_steps)
        return out

    jax.block_until_ready(call())  # first run: module load
    isolated = []
    for _ in range(3):
        t0 = time.perf_counter()
        jax.block_until_ready(call())
        isolated.append(time.perf_counter() - t0)
    start_context = int(jax.device_get(engine.state.lengths[0]))

    inflight, produced = [], 0
    t0 = time.perf_counter()
    for _ in range(calls):
        inflight.append(call())
        if len(inflight) > 1:  # the engine's pattern: read one call behind the device
            produced += int((jax.device_get(inflight.pop(0)) >= 0).sum())
    produced += sum(int((jax.device_get(out) >= 0).sum()) for out in inflight)
    elapsed = time.perf_counter() - t0
    expected = batch * cfg.decode_steps * calls
    if produced != expected:
        raise RuntimeError(f"decode produced {produced} tokens, expected {expected}: a request stopped early")
    result = dict(compile_s=compile_s, weight_copies=[list(c) for c in copies],
                  call_ms_isolated=1e3 * float(np.median(isolated)), call_ms_loop=1e3 * elapsed / calls,
                  tok_s=produced / elapsed, mean_context=start_context + cfg.decode_steps * calls / 2)
    if profile:
        steps = 2 * cfg.decode_steps
        kernels = profiled_kernel_seconds(lambda: jax.block_until_ready([call(), call()]))
        per_step = sorted(((1e6 * t / steps, name) for name, t in kernels.items()), reverse=True)
        result.update(profile_us_per_step_total=sum(t for t, _ in per_step),
                      profile_us_per_step=[[name, t] for t, name in per_step])
    return result


def time_e2e(engine: Engine, vocab: int, prompt: int, new: int, stream: bool) -> dict:
    """One request through ``Engine.run`` (real prefill): time to first token, decode tok/s after it, and the
    gaps between token events (with ``stream``, a token waits at most about one short call for its event)."""
    rng = np.random.default_rng(0)
    t0, arrivals, count = time.perf_counter(), [], 0
    for event in engine.run([random_text_request(rng, vocab, prompt, new)], stream=stream):
        if event.tokens:
            arrivals.append(time.perf_counter())
            count += len(event.tokens) if len(arrivals) > 1 else 0
    gaps_ms = 1e3 * np.diff(arrivals)
    return dict(stream=stream, ttft_ms=1e3 * (arrivals[0] - t0), decode_tok_s=count / (arrivals[-1] - arrivals[0]),
                event_gap_ms_median=float(np.median(gaps_ms)), event_gap_ms_max=float(gaps_ms.max()))


def time_hf(raw: dict, batch: int, prompt: int, new: int = 33) -> dict:
    import torch
    import transformers

    cfg = transformers.AutoConfig.for_model(**raw)
    model = transformers.AutoModelForImageTextToText.from_config(cfg, dtype=torch.bfloat16).cuda().eval()
    vocab = (raw.get("text_config") or raw)["vocab_size"]
    ids = torch.randint(0, vocab, (batch, prompt), device="cuda")
    gen = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
    try:
        with torch.no_grad():
            model.generate(ids, max_new_tokens=2, min_new_tokens=2, **gen)  # warm-up
            times = {}
            for n in (1, new):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                model.generate(ids, max_new_tokens=n, min_new_tokens=n, **gen)
                torch.cuda.synchronize()
                times[n] = time.perf_counter() - t0
    finally:
        del model
        torch.cuda.empty_cache()
    return dict(ttft_ms=1e3 * times[1], decode_tok_s=batch * (new - 1) / (times[new] - times[1]))


# ------------------------------------------------------------------------------------------- main


def run_model(name: str, raw: dict, cases: list[tuple[int, int, int | None]], args, bandwidth: float) -> dict:
    cfg = parse_config(text_only(raw))
    if args.fp8:
        cfg = with_fp8_quantization(cfg)
    dtype = jnp.float32 if args.tiny else jnp.bfloat16
    graphdef, params = random_params(abstract_model(cfg, dtype), jax.random.key(0))
    rows = []
    margin = args.steps * (args.calls + 5) + 8  # the isolated and warm-up calls decode too
    # Cases sharing a context and max_len share one engine (one cache allocation); each batch size is its own
    # program.
    for context, max_len in sorted({(c, m) for _, c, m in cases}, key=lambda cm: (cm[0], cm[1] or 0)):
        batches = sorted(b for b, c, m in cases if (c, m) == (context, max_len))
        max_len = max_len or context + margin
        engine = Engine(graphdef, params, EngineConfig(
            max_batch=max(batches), max_len=max_len, prompt_buckets=(min(context, 1024),),
            decode_steps=args.steps, batch_buckets=tuple(batches), prefix_cache=False), eos_ids=())
        for batch in batches:
            hlo_path = (pathlib.Path(args.out) / f"decode-hlo-{name}-{batch}x{context}.txt") if args.profile else None
            measured = time_decode(engine, batch, context, args.calls, profile=args.profile, hlo_path=hlo_path)
            need = step_bytes(cfg, params, batch, measured["mean_context"])
            roofline = batch * bandwidth / need["total"]
            row = dict(batch=batch, context=context, max_len=max_len, bytes_per_step=need, roofline_tok_s=roofline,
                       pct_of_roofline=100 * measured["tok_s"] / roofline, ours=measured)
            rows.append(row)
            print(json.dumps(dict(model=name, **row)), flush=True)
        del engine
    e2e = None
    if args.e2e:
        context = cases[0][1]
        engine = Engine(graphdef, params, EngineConfig(max_batch=1, max_len=context + 256, prompt_buckets=(context,),
                                                       decode_steps=args.steps, chunked_prefill=False,
                                                       prefix_cache=False), eos_ids=())
        engine.warmup(progress=False, vision=False)
        e2e = [dict(batch=1, prompt=context, **time_e2e(engine, cfg.text.vocab_size, context, 128, stream))
               for stream in (False, True)]
        print(json.dumps(dict(model=name, e2e=e2e)), flush=True)
        del engine
    del params
    for batch, context, _ in parse_cases(args.hf):
        row = next((r for r in rows if (r["batch"], r["context"]) == (batch, context)), None)
        if row is not None:
            try:
                row["hf"] = time_hf(raw, batch, context)
            except Exception as err:  # noqa: BLE001 - a peer that cannot run this case is reported, not fatal
                row["hf"] = dict(error=f"{type(err).__name__}: {err}"[:500])
            print(json.dumps(dict(model=name, batch=batch, context=context, hf=row["hf"])), flush=True)
    return dict(model=name, config=raw, rows=rows, e2e=e2e)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=DEFAULT_MODELS)
    ap.add_argument("--cases", default=DEFAULT_CASES)
    ap.add_argument("--calls", type=int, default=8, help="decode calls timed back to back")
    ap.add_argument("--steps", type=int, default=16, help="tokens per decode call")
    ap.add_argument("--hf", default="", help="cases to time HF transformers on, e.g. 1x1024,8x1024")
    ap.add_argument("--e2e", action="store_true", help="also batch 1 through Engine.run with a real prefill")
    ap.add_argument("--profile", action="store_true",
                    help="GPU kernel time per step by kernel name, every case (and the compiled HLO beside the JSON)")
    ap.add_argument("--fp8", action="store_true",
                    help="linear layers in FP8 (128x128 block scales, as convert --dtype fp8 stores them)")
    ap.add_argument("--tiny", action="store_true", help="tiny configs on the CPU (checks the script)")
    ap.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results"))
    args = ap.parse_args()
    cases = parse_cases(args.cases)
    bandwidth = copy_bandwidth(1 << 24 if args.tiny else 1 << 30)
    device = jax.devices()[0].device_kind
    print(f"{device}: copy bandwidth {bandwidth / 1e9:.0f} GB/s", flush=True)

    models = []
    for name in args.models.split(","):
        models.append(run_model(name, bench_config(name, args.tiny), cases, args, bandwidth))

    print(f"\n{'model':>16} {'batch':>5} {'context':>7} {'max_len':>7} {'tok/s':>9} {'roofline':>9} {'%':>5} {'call ms':>8} "
          f"{'isolated':>8} {'copies':>6} {'HF tok/s':>9}")
    for m in models:
        for r in m["rows"]:
            hf = r.get("hf", {}).get("decode_tok_s", float("nan"))
            o = r["ours"]
            print(f"{m['model']:>16} {r['batch']:>5} {r['context']:>7} {r['max_len']:>7} {o['tok_s']:>9.1f} {r['roofline_tok_s']:>9.1f} "
                  f"{r['pct_of_roofline']:>5.1f} {o['call_ms_loop']:>8.2f} {o['call_ms_isolated']:>8.2f} "
                  f"{len(o['weight_copies']):>6} {hf:>9.1f}")
        for r in m["rows"]:
            if r["ours"].get("profile_us_per_step"):
                top = ", ".join(f"{name[:40]} {t:.0f}" for name, t in r["ours"]["profile_us_per_step"][:8])
                print(f"{'':>16} B{r['batch']} kernels {r['ours']['profile_us_per_step_total']:.0f} us/step: {top}")
        for e in m["e2e"] or []:
            print(f"{m['model']:>16} e2e batch 1, prompt {e['prompt']}{', streamed' if e['stream'] else ''}: TTFT "
                  f"{e['ttft_ms']:.1f} ms, decode {e['decode_tok_s']:.1f} tok/s, token events every "
                  f"{e['event_gap_ms_median']:.1f} ms (max {e['event_gap_ms_max']:.1f})")
    result = dict(**run_info(), tiny=args.tiny, fp8=args.fp8, steps=args.steps, calls=args.calls,
                  copy_bandwidth_bytes_s=bandwidth, models=models)
    write_result(args.out, "decode", result, fp8=args.fp8, tiny=args.tiny)


if __name__ == "__main__":
    main()
