"""Prefix caching on released architectures with random bf16 weights (issue 30).

    python bench/prefix_cache.py [--models qwen3_5-9b,qwen3_vl-8b] [--turn1 8192] [--system 2048] [--tiny]

Through the public API (``QwenVL.generate`` with token ids and HF-named image arrays, no tokenizer), default
engine buckets, every program compiled by ``warmup()`` first:

- turn 2: a conversation's first turn of ``--turn1`` random tokens (Qwen3-VL-8B: plus one 1024 x 1024 image)
  and ``--new`` generated tokens, then its second turn (turn 1, its answer, ``--tail`` new tokens): time to
  first token with turn 1 in the prefix cache against the same request with the cache cleared (median of
  ``--repeats``, each repeat a different tail). Target <= 0.15x.
- shared system prompt: ``--requests`` requests of one ``--system``-token system prompt plus 20-200 user
  tokens, submitted together, ``--new`` tokens each: end-to-end tokens/s with the prefix cache (cleared before
  the run: the first request pays for the system prompt) against an engine without it. Target >= 2x.
- decode: batch-1 decode tok/s of a 1K-token prompt, prefix cache on against off (bookkeeping cost <= 3%).

``--tiny`` runs tiny configs on the CPU to check the script. Prints a table and writes
bench/results/prefix_cache-<device>.json (device, jax version, commit, date, every figure).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile
import time

import jax.numpy as jnp
import numpy as np

# Run as a script, the repo root replaces the script's directory: bench/kernels.py would shadow the `kernels`
# package that transformers imports.
if sys.path[0] == str(pathlib.Path(__file__).resolve().parent):
    sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])
from bench.models import text_only  # noqa: E402
from bench.prefill import build, image_inputs, model_config  # noqa: E402
from bench.run_info import run_info, write_result  # noqa: E402

DEFAULT_MODELS = "qwen3_5-9b,qwen3_vl-8b"
IMAGE_MODELS = ("qwen3_vl-8b", "qwen2_5_vl-7b")


def turn_two(args, name: str, dtype, work: pathlib.Path) -> dict:
    raw = model_config(name, args.tiny)
    with_image = name in IMAGE_MODELS
    model = build(raw if with_image else text_only(raw), dtype, work / f"turn-{name}")
    rng = np.random.default_rng(0)
    if with_image:
        turn1 = image_inputs(model.config, 1, 64 if args.tiny else 1024, args.turn1, rng)
    else:
        turn1 = dict(input_ids=rng.integers(0, 1000, args.turn1).astype(np.int32))
    vision = {k: v for k, v in turn1.items() if k != "input_ids"}
    ids1 = turn1["input_ids"]
    longest = len(ids1) + args.new + args.tail
    # No warmup(): the untimed first repeat compiles what the timed ones use (warmup() compiles every vision
    # layout and bucket, minutes at 16K max_len).
    model.configure(max_batch=1, max_len=1 << (longest + 1).bit_length())
    answer = model.generate(input_ids=ids1.tolist(), max_new_tokens=args.new, **vision).token_ids
    base = list(ids1) + answer
    ttft = {"cached": [], "cold": []}
    hits = []
    for r in range(args.repeats + 1):  # the first of each kind also runs anything compiled on first sight
        tail = np.random.default_rng(100 + r).integers(0, 1000, args.tail).tolist()
        for kind in ("cold", "cached"):
            model.clear_prefix_cache()
            if kind == "cached":  # turn 1 and its answer cached, as after the first turn
                model.generate(input_ids=ids1.tolist(), max_new_tokens=args.new, **vision)
            before = model.prefix_cache_stats()["hit_tokens"]
            result = model.generate(input_ids=base + tail, max_new_tokens=1, **vision)
            if r:
                ttft[kind].append(result.stats.ttft_s)
                if kind == "cached":
                    hits.append(model.prefix_cache_stats()["hit_tokens"] - before)
    row = dict(model=name, image=with_image, turn1_tokens=len(ids1), answer_tokens=len(answer),
               turn2_tokens=len(base) + args.tail, hit_tokens=hits,
               cold_ttft_ms=1e3 * float(np.median(ttft["cold"])), cached_ttft_ms=1e3 * float(np.median(ttft["cached"])))
    row["cached_over_cold"] = row["cached_ttft_ms"] / row["cold_ttft_ms"]
    print(json.dumps(row), flush=True)
    return row


def shared_system_prompt(args, name: str, dtype, work: pathlib.Path) -> dict:
    model = build(text_only(model_config(name, args.tiny)), dtype, work / f"shared-{name}")
    rng = np.random.default_rng(1)
    system = rng.integers(0, 1000, args.system)
    prompts = [np.concatenate([system, rng.integers(0, 1000, n)]).astype(np.int32).tolist()
               for n in rng.integers(20, 201, args.requests)]
    row = dict(model=name, requests=args.requests, system_tokens=args.system, new_tokens=args.new,
               prompt_tokens=sum(len(p) for p in prompts))
    for cache in (False, True):
        model.configure(max_batch=args.requests, max_len=args.system + 256 + args.new, prefix_cache=cache)
        model.generate(input_ids=prompts, max_new_tokens=args.new)  # compiles what the timed run uses
        model.clear_prefix_cache()
        start = model.prefix_cache_stats() if cache else None
        t0 = time.perf_counter()
        results = model.generate(input_ids=prompts, max_new_tokens=args.new)
        seconds = time.perf_counter() - t0
        key = "on" if cache else "off"
        row[f"{key}_s"] = seconds
        row[f"{key}_tok_s"] = sum(r.stats.new_tokens for r in results) / seconds
        row[f"{key}_mean_ttft_ms"] = 1e3 * float(np.mean([r.stats.ttft_s for r in results]))
        if cache:
            stats = model.prefix_cache_stats()
            row.update(hits=stats["hits"] - start["hits"], hit_tokens=stats["hit_tokens"] - start["hit_tokens"])
    row["on_over_off"] = row["on_tok_s"] / row["off_tok_s"]
    print(json.dumps(row), flush=True)
    return row


def decode_overhead(args, name: str, dtype, work: pathlib.Path) -> dict:
    model = build(text_only(model_config(name, args.tiny)), dtype, work / f"decode-{name}")
    prompt = np.random.default_rng(2).integers(0, 1000, args.decode_prompt).tolist()
    row = dict(model=name, prompt_tokens=len(prompt), new_tokens=args.decode_new)
    for cache in (False, True):
        model.configure(max_batch=1, max_len=args.decode_prompt + args.decode_new + 8, prefix_cache=cache)
        model.warmup(progress=False)
        model.generate(input_ids=prompt, max_new_tokens=args.decode_new)
        rates = [model.generate(input_ids=prompt, max_new_tokens=args.decode_new).stats.decode_tok_s
                 for _ in range(args.repeats)]
        row["on_tok_s" if cache else "off_tok_s"] = float(np.median(rates))
    row["on_over_off"] = row["on_tok_s"] / row["off_tok_s"]
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=DEFAULT_MODELS)
    ap.add_argument("--sections", default="turn2,shared,decode")
    ap.add_argument("--turn1", type=int, default=8192, help="turn 1's text tokens")
    ap.add_argument("--new", type=int, default=64, help="tokens generated per turn / per shared-prompt request")
    ap.add_argument("--tail", type=int, default=50, help="turn 2's new tokens")
    ap.add_argument("--system", type=int, default=2048)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--decode-prompt", type=int, default=1024)
    ap.add_argument("--decode-new", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tiny", action="store_true", help="tiny configs on the CPU (checks the script)")
    ap.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results"))
    args = ap.parse_args()
    if args.tiny:
        args.turn1, args.system, args.requests, args.new, args.tail = 300, 300, 6, 8, 10
        args.decode_prompt, args.decode_new, args.repeats = 64, 16, 2
    dtype = jnp.float32 if args.tiny else jnp.bfloat16
    sections = args.sections.split(",")
    result = dict(**run_info(), tiny=args.tiny, turn2=[], shared=[], decode=[])
    with tempfile.TemporaryDirectory() as tmp:
        work = pathlib.Path(tmp)
        for name in args.models.split(","):
            if "turn2" in sections:
                result["turn2"].append(turn_two(args, name, dtype, work))
            if "shared" in sections:
                result["shared"].append(shared_system_prompt(args, name, dtype, work))
            if "decode" in sections:
                result["decode"].append(decode_overhead(args, name, dtype, work))
    for r in result["turn2"]:
        print(f"turn 2 {r['model']:>14} ({r['turn2_tokens']} tokens{', image' if r['image'] else ''}): cached "
              f"{r['cached_ttft_ms']:.1f} ms, cold {r['cold_ttft_ms']:.1f} ms = {r['cached_over_cold']:.3f}x "
              f"(hit {r['hit_tokens']})")
    for r in result["shared"]:
        print(f"shared {r['model']:>14} {r['requests']} x ({r['system_tokens']} + user): on {r['on_tok_s']:.0f} tok/s, "
              f"off {r['off_tok_s']:.0f} = {r['on_over_off']:.2f}x; mean TTFT {r['on_mean_ttft_ms']:.0f} vs "
              f"{r['off_mean_ttft_ms']:.0f} ms ({r['hits']} hits, {r['hit_tokens']} tokens)")
    for r in result["decode"]:
        print(f"decode {r['model']:>14} B1: on {r['on_tok_s']:.1f} tok/s, off {r['off_tok_s']:.1f} = "
              f"{r['on_over_off']:.3f}x")
    write_result(args.out, "prefix_cache", result, tiny=args.tiny)


if __name__ == "__main__":
    main()
