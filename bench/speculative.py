"""MTP speculative decoding (issue 27): the cost of a speculative step against a plain one, and what it buys.

    python bench/speculative.py [--models qwen3_5-9b,qwen3_5-35b-a3b] [--batches 1,8] [--ks 1,2,3]
                                [--prompt 1024] [--new 128] [--tiny]

Per model (released config with its MTP head, random bf16 weights) and batch size, through ``Engine.run`` with
a real prefill of ``--prompt`` tokens per request: plain decode, then speculation with k drafts a step. Random
weights accept almost no MTP draft, so the MTP rows time the step itself (tokens/step ~ 1); the projected tok/s
at a per-draft acceptance a is B * E / step time, E = (1 - a^(k+1)) / (1 - a) the expected tokens a step. The
oracle rows feed the plain run's own tokens as drafts (``Request.draft_tokens``: every draft accepted) and
measure tok/s. In bf16 a verify pass over k + 1 tokens does not round exactly as k + 1 one-token steps, so
with random weights (near-tied logits) the speculative run leaves the plain run's tokens after a few dozen
(measured, H200) and the plain continuation stops being an oracle. The oracle is therefore the speculative
engine's own continuation under full acceptance, found by feeding each run's tokens back as the next run's
drafts until they reproduce themselves (``oracle_rounds``; ``oracle_fixed_point`` says whether that happened).
Decode time is measured from the last request's first token to the end.

Prints a table and writes bench/results/speculative-<device>.json (device, jax version, commit, date, every
figure). ``--tiny`` runs a tiny Qwen3.5 on the CPU to check the script.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

if sys.path[0] == str(pathlib.Path(__file__).resolve().parent):
    sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])
from bench.models import random_params, released_config, text_only  # noqa: E402
from bench.run_info import run_info, write_result  # noqa: E402
from qwenvl_jax.config import parse_config  # noqa: E402
from qwenvl_jax.engine import Engine, EngineConfig, Request  # noqa: E402
from qwenvl_jax.models.model import abstract_model  # noqa: E402
from qwenvl_jax.sampling import SamplingParams  # noqa: E402
from qwenvl_jax.tiny_model import TINY_CONFIGS, hf_config_dict  # noqa: E402

ACCEPTANCE = (0.6, 0.8, 0.9)
ORACLE_ROUNDS = 6


def expected_tokens(k: int, acceptance: float) -> float:
    """Tokens a step emits when each draft is accepted with this probability (until the first rejection)."""
    return (1 - acceptance ** (k + 1)) / (1 - acceptance)


def decode_run(engine: Engine, requests: list[Request]) -> tuple[dict, list[list[int]]]:
    """Decode tok/s after every request's first token, decode steps per request, tokens per request."""
    tokens = [[] for _ in requests]
    steps, firsts, window_tokens, t_last_first = 0, 0, 0, None
    for ev in engine.run(requests):
        now = time.perf_counter()
        if not tokens[ev.request_index]:
            firsts += 1
            tokens[ev.request_index] += ev.tokens
            window_tokens += len(ev.tokens) - 1
            steps += ev.steps
            if firsts == len(requests):
                t_last_first, window_tokens, steps = now, 0, 0
            continue
        tokens[ev.request_index] += ev.tokens
        if t_last_first is not None:
            window_tokens += len(ev.tokens)
            steps += ev.steps
    elapsed = time.perf_counter() - t_last_first
    per_request_steps = steps / len(requests)
    return dict(tok_s=window_tokens / elapsed, step_ms=1e3 * elapsed / per_request_steps,
                tokens_per_step=window_tokens / steps), tokens


def run_model(name: str, raw: dict, args) -> dict:
    cfg = parse_config(text_only(raw)).with_mtp_layers(1)
    dtype = jnp.float32 if args.tiny else jnp.bfloat16
    graphdef, params = random_params(abstract_model(cfg, dtype), jax.random.key(0))
    rng = np.random.default_rng(0)
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        prompts = [rng.integers(0, cfg.text.vocab_size, args.prompt).astype(np.int32) for _ in range(batch)]

        def requests(drafts=None):
            return [Request(p, np.broadcast_to(np.arange(len(p), dtype=np.int32), (3, len(p))).copy(), 0,
                            SamplingParams(), args.new, draft_tokens=None if drafts is None else drafts[i])
                    for i, p in enumerate(prompts)]

        def engine(k: int) -> Engine:
            e = Engine(graphdef, params, EngineConfig(
                max_batch=batch, max_len=args.prompt + args.new + 8, prompt_buckets=(args.prompt,),
                decode_steps=args.steps, batch_buckets=(batch,), chunked_prefill=False, speculative_tokens=k,
                prefix_cache=False),
                eos_ids=())
            e.warmup(progress=False, vision=False)
            return e

        plain_engine = engine(0)
        decode_run(plain_engine, requests())  # first run: module loads
        plain, continuation = decode_run(plain_engine, requests())
        del plain_engine
        oracle_drafts = [np.concatenate([p, c]) for p, c in zip(prompts, continuation)]
        row = dict(batch=batch, prompt=args.prompt, new=args.new, plain=plain, speculative=[])
        print(json.dumps(dict(model=name, batch=batch, plain=plain)), flush=True)
        for k in (int(x) for x in args.ks.split(",")):
            spec_engine = engine(k)
            decode_run(spec_engine, requests())
            mtp, _ = decode_run(spec_engine, requests())
            drafts, fixed_point = oracle_drafts, False
            for rounds in range(1, ORACLE_ROUNDS + 1):
                oracle, oracle_tokens = decode_run(spec_engine, requests(drafts))
                fixed_point = all(np.array_equal(d[len(p):], t) for d, p, t in zip(drafts, prompts, oracle_tokens))
                if fixed_point:
                    break
                drafts = [np.concatenate([p, t]) for p, t in zip(prompts, oracle_tokens)]
            del spec_engine
            entry = dict(k=k, mtp=mtp, oracle=oracle, oracle_rounds=rounds, oracle_fixed_point=fixed_point,
                         plain_tokens_kept=oracle_tokens == continuation,
                         step_cost_vs_plain=mtp["step_ms"] / plain["step_ms"],
                         oracle_speedup=oracle["tok_s"] / plain["tok_s"],
                         projected_tok_s={str(a): batch * expected_tokens(k, a) / mtp["step_ms"] * 1e3
                                          for a in ACCEPTANCE})
            row["speculative"].append(entry)
            print(json.dumps(dict(model=name, batch=batch, **entry)), flush=True)
        rows.append(row)
    return dict(model=name, config=raw, rows=rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="qwen3_5-9b")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--ks", default="1,2,3")
    ap.add_argument("--prompt", type=int, default=1024)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--steps", type=int, default=16, help="decode steps per call")
    ap.add_argument("--tiny", action="store_true", help="a tiny Qwen3.5 on the CPU (checks the script)")
    ap.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results"))
    args = ap.parse_args()
    if args.tiny:
        args.prompt, args.new = min(args.prompt, 64), min(args.new, 24)
    models = []
    for name in args.models.split(","):
        raw = hf_config_dict("qwen3_5", *TINY_CONFIGS["qwen3_5"]) if args.tiny else released_config(name)
        models.append(run_model(name, raw, args))

    print(f"\n{'model':>16} {'B':>3} {'k':>2} {'step ms':>8} {'x plain':>8} {'tok/step':>8} "
          + " ".join(f"{'@' + str(a):>8}" for a in ACCEPTANCE) + f" {'oracle':>8} {'speedup':>8} {'fixed':>6}")
    for m in models:
        for r in m["rows"]:
            p = r["plain"]
            print(f"{m['model']:>16} {r['batch']:>3} {0:>2} {p['step_ms']:>8.2f} {1:>8.2f} {p['tokens_per_step']:>8.2f} "
                  + " ".join(f"{p['tok_s']:>8.1f}" for _ in ACCEPTANCE) + f" {'':>8} {'':>8} {'':>6}")
            for s in r["speculative"]:
                print(f"{m['model']:>16} {r['batch']:>3} {s['k']:>2} {s['mtp']['step_ms']:>8.2f} "
                      f"{s['step_cost_vs_plain']:>8.2f} {s['mtp']['tokens_per_step']:>8.2f} "
                      + " ".join(f"{s['projected_tok_s'][str(a)]:>8.1f}" for a in ACCEPTANCE)
                      + f" {s['oracle']['tok_s']:>8.1f} {s['oracle_speedup']:>8.2f} {str(s['oracle_fixed_point']):>6}")
    result = dict(**run_info(), tiny=args.tiny, models=models)
    write_result(args.out, "speculative", result, tiny=args.tiny)


if __name__ == "__main__":
    main()
