"""What the Gated DeltaNet chunk kernels weigh in a whole Qwen3.5 prefill (issue 5's B1xT16384 target, end to end).

    python bench/prefill_share.py [--prompts 4096,16384] [--repeats 5] [--tiny]

Qwen3.5-9B's text stack (the released config, bench/configs/qwen3_5-9b.json; random bf16 weights made on the device), one prompt per prefill.
Per prompt length: time to first token (median of --repeats runs of the engine), then one prefill under
jax.profiler: the GPU kernels' device time, summed by name, and the share taken by the chunk kernels
(gdr_chunk_*), next to the standalone chunk_prefill call at the same shape and the prefill's FLOP floor
(2 x tokens x matmul weights + causal attention + chunk FLOPs, at the bf16 matmul rate measured in the same run),
and one full-attention layer's attention alone: the model's path against cuDNN's flash attention. The SM clock
and power draw are sampled during the prefills and the standalone calls (a GEMM-bound prefill runs at the power
cap, so its kernels see lower clocks than the same kernels alone).
``--tiny`` runs a tiny config on the CPU to check the script (no GPU kernels in its profile).

Prints a table and writes bench/results/prefill_share-<device>.json (device, jax version, commit, date, figures).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch measures the ceilings in this process

import jax  # noqa: E402
import numpy as np  # noqa: E402

# Run as a script, the repo root replaces the script's directory: bench/kernels.py would shadow the `kernels`
# package that transformers imports.
if sys.path[0] == str(pathlib.Path(__file__).resolve().parent):
    sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])
from bench.models import (  # noqa: E402
    delta_rule_flops, prefill_flops, profiled_kernel_seconds, random_params, random_text_request, released_config,
)
from bench.kernels import gdr_inputs, measure_ceilings, time_jax_calls  # noqa: E402
from bench.run_info import run_info, write_result  # noqa: E402
from pallas_kernels.gated_delta_rule.chunk import chunk_prefill  # noqa: E402
from qwenvl_jax.config import parse_config  # noqa: E402
from qwenvl_jax.engine import Engine, EngineConfig  # noqa: E402
from qwenvl_jax.models.attention import causal_attention  # noqa: E402
from qwenvl_jax.models.model import abstract_model  # noqa: E402
from qwenvl_jax.tiny_model import TINY_CONFIGS, hf_config_dict  # noqa: E402

GDR_PREFIX = "gdr_chunk"
EVICTED_CALLS = 5  # chunk calls profiled, each after an L2 eviction


def attention_seconds(text, prompt: int) -> dict:
    """One full-attention layer's causal attention at this prompt length, jitted: the model's path
    (`causal_attention`, XLA with a dense mask) against cuDNN's flash attention, and their largest difference."""
    ks = jax.random.split(jax.random.key(1), 3)
    q = jax.random.normal(ks[0], (1, prompt, text.num_attention_heads, text.head_dim), jax.numpy.bfloat16)
    k, v = (jax.random.normal(key, (1, prompt, text.num_key_value_heads, text.head_dim), jax.numpy.bfloat16)
            for key in ks[1:])
    lengths = jax.numpy.full((1,), prompt, jax.numpy.int32)
    ours = jax.jit(causal_attention)
    cudnn = jax.jit(lambda q, k, v, n: jax.nn.dot_product_attention(
        q, k, v, is_causal=True, query_seq_lengths=n, key_value_seq_lengths=n, implementation="cudnn"))
    diff = jax.numpy.abs(ours(q, k, v, lengths).astype(float) - cudnn(q, k, v, lengths).astype(float)).max()
    return dict(model_path_ms=1e3 * time_jax_calls(ours, (q, k, v, lengths), calls=5),
                cudnn_ms=1e3 * time_jax_calls(cudnn, (q, k, v, lengths), calls=5), max_abs_diff=float(diff))


def time_to_first_token(engine: Engine, vocab: int, prompt: int, repeats: int) -> list[float]:
    rng = np.random.default_rng(0)
    times = []
    for _ in range(repeats):
        request = random_text_request(rng, vocab, prompt, 1)
        t0, first = time.perf_counter(), None
        for _ in engine.run([request]):
            first = time.perf_counter() - t0 if first is None else first
        times.append(first)
    return times


@contextlib.contextmanager
def sampled_clocks(into: dict, key: str):
    """Samples the GPU's SM clock and power draw every 50 ms while the block runs (nvidia-smi), and stores
    their medians under into[key]: the chunk kernels ran slower inside the prefill than alone."""
    proc = subprocess.Popen(["nvidia-smi", "--query-gpu=clocks.sm,power.draw", "--format=csv,noheader,nounits",
                             "-lms", "50"], stdout=subprocess.PIPE, text=True)
    try:
        yield
    finally:
        proc.terminate()
        samples = [line.split(",") for line in proc.communicate()[0].splitlines() if line.count(",") == 1]
        into[key] = dict(samples=len(samples), sm_mhz=statistics.median(float(c) for c, _ in samples),
                         power_w=statistics.median(float(w) for _, w in samples)) if samples else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", default="4096,16384")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tiny", action="store_true", help="tiny config on the CPU (checks the script)")
    ap.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results"))
    args = ap.parse_args()
    prompts = [int(p) for p in args.prompts.split(",")]

    if args.tiny:
        name, raw = "tiny qwen3_5", hf_config_dict("qwen3_5", *TINY_CONFIGS["qwen3_5"])
    else:
        name, raw = "Qwen3.5-9B", released_config("qwen3_5-9b")
    cfg = parse_config(raw)
    dtype = jax.numpy.float32 if args.tiny else jax.numpy.bfloat16
    graphdef, params = random_params(abstract_model(cfg, dtype), jax.random.key(0))
    on_gpu = jax.default_backend() == "gpu"
    ceilings = measure_ceilings() if on_gpu else None
    linear_layers = cfg.text.layer_types.count("linear_attention")
    device = jax.devices()[0].device_kind
    print(f"{device}: {name}, {linear_layers} Gated DeltaNet layers of {len(cfg.text.layer_types)}; ceilings {ceilings}")

    rows = []
    for prompt in prompts:
        engine = Engine(graphdef, params, EngineConfig(max_batch=1, max_len=prompt + 8, prompt_buckets=(prompt,),
                                                       decode_steps=1, chunked_prefill=False,
                                                       prefix_cache=False), eos_ids=())
        engine.warmup(progress=False, vision=False)
        clocks: dict = {}
        with sampled_clocks(clocks, "prefill") if on_gpu else contextlib.nullcontext():
            ttft = time_to_first_token(engine, cfg.text.vocab_size, prompt, args.repeats)
        kernels = profiled_kernel_seconds(lambda: time_to_first_token(engine, cfg.text.vocab_size, prompt, 1))
        kernel_s = sum(kernels.values())
        gdr_s = sum(s for k, s in kernels.items() if GDR_PREFIX in k)
        flops = prefill_flops(cfg, params, prompt)
        r = dict(prompt=prompt, ttft_ms=[1e3 * t for t in ttft], ttft_median_ms=1e3 * statistics.median(ttft),
                 prefill_gflop=flops / 1e9, gpu_kernel_ms=1e3 * kernel_s, gdr_kernel_ms=1e3 * gdr_s,
                 gdr_share_of_kernels=gdr_s / kernel_s if kernel_s else None,
                 top_kernels_ms={k: 1e3 * s for k, s in sorted(kernels.items(), key=lambda kv: -kv[1])[:15]})
        if on_gpu:
            q, k, v, g, beta, state = gdr_inputs(1, prompt, num_k_heads=cfg.text.linear_num_key_heads,
                                                 num_v_heads=cfg.text.linear_num_value_heads)
            lengths = jax.numpy.full((1,), prompt, jax.numpy.int32)
            call = jax.jit(lambda *a: chunk_prefill(*a, scale=q.shape[-1] ** -0.5))
            with sampled_clocks(clocks, "chunk_alone"):
                chunk_s = time_jax_calls(call, (q, k, v, g, beta, state, lengths), calls=200)
            # The same call under the profiler: its kernels' figures beside the ones inside the prefill, once
            # right after the timed calls and once per call after a pass over 1 GiB has evicted L2.
            alone = profiled_kernel_seconds(lambda: jax.block_until_ready(call(q, k, v, g, beta, state, lengths)))
            r["chunk_alone_profiled_us"] = {n: 1e6 * t for n, t in alone.items() if GDR_PREFIX in n}
            evict = jax.jit(lambda x: x + 1)
            scratch = jax.numpy.zeros((1 << 28,), jax.numpy.float32)

            def after_eviction() -> None:
                for _ in range(EVICTED_CALLS):
                    jax.block_until_ready(evict(scratch))
                    jax.block_until_ready(call(q, k, v, g, beta, state, lengths))

            flushed = profiled_kernel_seconds(after_eviction)
            r["chunk_after_l2_eviction_profiled_us"] = {n: 1e6 * t / EVICTED_CALLS for n, t in flushed.items()
                                                        if GDR_PREFIX in n}
            r["clocks"] = clocks
            r["chunk_in_prefill_per_layer_us"] = {n: 1e6 * t / linear_layers for n, t in kernels.items()
                                                  if GDR_PREFIX in n}
            chunk_floor_s = delta_rule_flops(cfg.text, prompt) / (ceilings["bf16_matmul_TFLOPs"] * 1e12)
            r["attention_per_layer"] = attention_seconds(cfg.text, prompt)
            r.update(prefill_floor_ms=1e3 * flops / (ceilings["bf16_matmul_TFLOPs"] * 1e12),
                     chunk_call_us=1e6 * chunk_s, chunk_floor_us=1e6 * chunk_floor_s,
                     # What meeting "within 2x of the floor" would take off this prefill, by the profile's figure.
                     saving_at_2x_floor_ms=1e3 * max(0.0, gdr_s - linear_layers * 2 * chunk_floor_s))
        rows.append(r)
        print(json.dumps(r), flush=True)

    full_layers = cfg.text.layer_types.count("full_attention")
    print(f"\n{'prompt':>7} {'TTFT ms':>8} {'floor ms':>9} {'kernels ms':>11} {'gdr ms':>7} {'gdr %':>6} "
          f"{'chunk call us':>14} {'x layers ms':>12} {'2x-floor saves ms':>18}")
    for r in rows:
        share = 100 * r["gdr_share_of_kernels"] if r["gdr_share_of_kernels"] is not None else float("nan")
        print(f"{r['prompt']:>7} {r['ttft_median_ms']:>8.1f} {r.get('prefill_floor_ms', float('nan')):>9.1f} "
              f"{r['gpu_kernel_ms']:>11.1f} {r['gdr_kernel_ms']:>7.2f} {share:>6.1f} "
              f"{r.get('chunk_call_us', float('nan')):>14.1f} "
              f"{linear_layers * r.get('chunk_call_us', float('nan')) / 1e3:>12.2f} "
              f"{r.get('saving_at_2x_floor_ms', float('nan')):>18.2f}")
        if "attention_per_layer" in r:
            a = r["attention_per_layer"]
            print(f"{'':>7} attention x {full_layers} layers: model path {full_layers * a['model_path_ms']:.1f} ms, "
                  f"cuDNN flash {full_layers * a['cudnn_ms']:.1f} ms (max |diff| {a['max_abs_diff']:.2e})")
    result = dict(**run_info(), model=name, tiny=args.tiny, linear_layers=linear_layers, ceilings=ceilings,
                  rows=rows)
    write_result(args.out, "prefill_share", result, tiny=args.tiny)


if __name__ == "__main__":
    main()
