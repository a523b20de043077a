"""The OpenAI-compatible server (issue 31) under load, next to the same workload in-process.

    python bench/serve.py [--model qwen3_5-9b] [--concurrency 1,8,64] [--requests 16,32,128] [--prompt 512,1024]
                          [--new 128] [--max-seconds 60] [--tiny]

The model is the released config (bench/configs/MODEL.json, the decoder alone) with random bf16 weights, built
in this process and served by ``server.create_app`` under uvicorn on 127.0.0.1 (a thread of this process, as
``qwenvl serve`` runs it); a temporary directory holds a generated tokenizer covering the whole vocabulary and a
generation_config.json naming no end-of-sequence id, so every request runs to its ``max_tokens`` in both modes.
The load generator is a separate process (it must not take the server's GIL): per concurrency C, ``--requests``
streaming ``/v1/completions`` requests of random token-id prompts (lengths uniform in ``--prompt``), greedy,
``--new`` tokens each, at most C in flight (the next is sent when one ends), none sent after ``--max-seconds``.

Per concurrency and mode: TTFT p50/p99 (request sent -> first chunk holding a token), inter-token latency p50/p99
per token (each gap between chunks divided by the tokens of the chunk it ends, counted once per token; the server's
chunks carry text, so their token counts are estimated from their share of the request's text), completion
tokens received (the server's usage counts) and output tok/s (tokens / first send to last token). In-process is
the same workload through the engine's own loop (``Scheduler``, what ``generate()`` / ``Engine.run`` drive),
streaming as the online engine does, submitting the next request when one ends, without HTTP. Server overhead =
1 - server tok/s / in-process tok/s; TTFT overhead = server TTFT p50 - in-process TTFT p50. "gap ms": the host's
time per decode call between reading it and dispatching the next, in loop iterations that admit no request (the
engine's counters; the server's from /metrics), when the device idles. Issue 31's targets:
<= 5% at concurrency 64, <= 3 ms at concurrency 1.

Prints a table and writes bench/results/serve-<device>.json (device, jax version, commit, date, every figure).
``--tiny`` runs a tiny Qwen3.5 on the CPU to check the script.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import dataclasses
import itertools
import json
import multiprocessing
import os
import pathlib
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

if sys.path[0] == str(pathlib.Path(__file__).resolve().parent):
    sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])
from bench.models import random_params, random_text_request, released_config, text_only  # noqa: E402
from bench.run_info import run_info, write_result  # noqa: E402
from qwenvl_jax import tiny_checkpoint_assets  # noqa: E402
from qwenvl_jax.config import parse_config  # noqa: E402
from qwenvl_jax.engine import Request, Scheduler  # noqa: E402
from qwenvl_jax.models.model import abstract_model  # noqa: E402
from qwenvl_jax.qwenvl import QwenVL  # noqa: E402
from qwenvl_jax.tiny_model import TINY_CONFIGS, hf_config_dict  # noqa: E402

NAME = "bench"  # the served model name
WARMUP_NEW = 8  # tokens per warm-up request

# One request's trace, in both modes: {"sent": s, "chunks": [[s, tokens], ...], "tokens": completion tokens}
# (perf_counter seconds: CLOCK_MONOTONIC, one clock for every process).
Trace = dict


# ------------------------------------------------------------------------------------------- the model


def build_model(raw: dict, dtype: jnp.dtype, directory: pathlib.Path) -> QwenVL:
    """The decoder with random weights, as a QwenVL whose directory holds only what serving reads: a tokenizer
    covering the vocabulary and a generation config with no end-of-sequence id."""
    cfg = parse_config(text_only(raw))
    graphdef, params = random_params(abstract_model(cfg, dtype), jax.random.key(0))
    tiny_checkpoint_assets.save(directory, cfg.family, vocab_size=cfg.text.vocab_size)
    # Both modes run every request to max_tokens (the server's API has no ignore_eos).
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": []}))
    return QwenVL(cfg, nnx.merge(graphdef, params), directory)


# ------------------------------------------------------------------------------------------- in-process


def run_in_process(scheduler: Scheduler, requests: Sequence[Request], concurrency: int, max_seconds: float
                   ) -> list[Trace]:
    """The workload through the engine's loop: ``concurrency`` requests in flight, the next submitted between
    steps once one ends (as the online engine takes its inbox), none after ``max_seconds``."""
    traces: dict[int, Trace] = {}
    waiting = iter(enumerate(requests))
    deadline = time.perf_counter() + max_seconds

    def submit(count: int) -> None:
        if time.perf_counter() >= deadline:
            return
        for i, request in itertools.islice(waiting, count):
            traces[i] = dict(sent=time.perf_counter(), chunks=[], tokens=0)
            scheduler.submit(i, request)

    submit(concurrency)
    while scheduler.busy:
        ended = 0
        for event in scheduler.step():
            if event.tokens:
                trace = traces[event.request_index]
                trace["chunks"].append([time.perf_counter(), len(event.tokens)])
                trace["tokens"] += len(event.tokens)
            ended += event.finished
        submit(ended)
    return list(traces.values())


# ------------------------------------------------------------------------------------------- the server


@contextlib.contextmanager
def serving(model: QwenVL) -> Iterator[str]:
    """``qwenvl serve``'s application over ``model`` under uvicorn on 127.0.0.1 (a free port), in a thread of this
    process; yields its URL. Leaving stops uvicorn, whose shutdown closes the online engine."""
    import uvicorn

    from qwenvl_jax.online import OnlineEngine
    from qwenvl_jax.server import create_app

    app = create_app(model, OnlineEngine(model.engine()), NAME)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    thread = threading.Thread(target=server.run, kwargs=dict(sockets=[sock]), name="uvicorn", daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("uvicorn did not start (its error is above)")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join()


async def _drive(url: str, prompts: list[list[int]], new: int, concurrency: int, max_seconds: float
                 ) -> list[Trace]:
    try:
        import httpx
    except ImportError:  # openai >= 3 installs its fork under this name
        import httpx2 as httpx

    gate = asyncio.Semaphore(concurrency)
    deadline = time.perf_counter() + max_seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=None, limits=limits) as client:

        async def one(prompt: list[int]) -> Trace | None:
            async with gate:
                if time.perf_counter() >= deadline:
                    return None
                body = dict(model=NAME, prompt=prompt, max_tokens=new, temperature=0, stream=True,
                            stream_options=dict(include_usage=True))
                chunks, tokens = [], 0
                sent = time.perf_counter()
                async with client.stream("POST", "/v1/completions", json=body) as response:
                    if response.status_code != 200:
                        raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread())[:500]!r}")
                    async for line in response.aiter_lines():
                        if not line.startswith("data: {"):  # blank separators, "data: [DONE]"
                            continue
                        data = json.loads(line[6:])
                        if "error" in data:
                            raise RuntimeError(f"the stream ended in an error: {data['error']}")
                        text = "".join(choice["text"] for choice in data["choices"])
                        if text:
                            chunks.append([time.perf_counter(), len(text)])
                        if data.get("usage"):
                            tokens = data["usage"]["completion_tokens"]
            if not chunks:
                raise RuntimeError(f"a request received no text ({tokens} tokens)")
            # Chunks carry text: each one's tokens are its share of the request's text, at least one.
            chars = sum(c for _, c in chunks)
            for chunk in chunks:
                chunk[1] = max(1, round(chunk[1] * tokens / chars))
            return dict(sent=sent, chunks=chunks, tokens=tokens)

        traces = await asyncio.gather(*(one(p) for p in prompts))
    return [t for t in traces if t is not None]


def load(url: str, prompts: list[list[int]], new: int, concurrency: int, max_seconds: float) -> list[Trace]:
    """The load generator (run in its own process): streams every prompt to the server, ``concurrency`` at a
    time, none sent after ``max_seconds``."""
    return asyncio.run(_drive(url, prompts, new, concurrency, max_seconds))


# ------------------------------------------------------------------------------------------- figures


def engine_counters(url: str) -> tuple[float, float]:
    """The server's decode calls and host-gap seconds so far, from its /metrics."""
    import urllib.request

    with urllib.request.urlopen(f"{url}/metrics") as response:
        values = dict(line.rsplit(" ", 1) for line in response.read().decode().splitlines()
                      if line and not line.startswith("#"))
    return float(values["qwenvl_decode_calls_total"]), float(values["qwenvl_decode_host_gap_seconds_total"])


def host_gaps(before: tuple[float, float], after: tuple[float, float]) -> dict:
    """Decode calls of a run and the device's idle time between them for the host, per call (Scheduler's
    counters: reading a call to dispatching the next, in iterations that admit no request)."""
    calls = after[0] - before[0]
    return dict(decode_calls=int(calls), host_gap_ms_per_call=1e3 * (after[1] - before[1]) / max(calls, 1))


def summarise(traces: list[Trace], expected_tokens: int) -> dict:
    """TTFT and per-token inter-token latency percentiles (ms), tokens received, output tok/s."""
    ttft = np.array([t["chunks"][0][0] - t["sent"] for t in traces])
    itl = np.concatenate([np.repeat((b[0] - a[0]) / b[1], b[1])
                          for t in traces for a, b in zip(t["chunks"], t["chunks"][1:])] or [np.zeros(0)])
    gaps = np.array([b[0] - a[0] for t in traces for a, b in zip(t["chunks"], t["chunks"][1:])])
    tokens = sum(t["tokens"] for t in traces)
    wall = max(t["chunks"][-1][0] for t in traces) - min(t["sent"] for t in traces)

    def ms(x: np.ndarray, q: float) -> float:
        return 1e3 * float(np.percentile(x, q)) if x.size else float("nan")

    return dict(requests=len(traces), tokens=tokens, expected_tokens=expected_tokens, wall_s=wall,
                tok_s=tokens / wall, ttft_ms_p50=ms(ttft, 50), ttft_ms_p99=ms(ttft, 99), itl_ms_p50=ms(itl, 50),
                itl_ms_p99=ms(itl, 99), chunk_gap_ms_p50=ms(gaps, 50),
                tokens_per_chunk=tokens / sum(len(t["chunks"]) for t in traces))


# ------------------------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen3_5-9b", help="a released config in bench/configs/")
    ap.add_argument("--concurrency", default="1,8,64")
    ap.add_argument("--requests", default="16,32,128", help="requests at each concurrency")
    ap.add_argument("--prompt", default="512,1024", help="prompt lengths: MIN,MAX tokens")
    ap.add_argument("--new", type=int, default=128, help="tokens generated per request")
    ap.add_argument("--max-seconds", type=float, default=60.0, help="no request is sent after this, per run")
    ap.add_argument("--tiny", action="store_true",
                    help="a tiny Qwen3.5 on the CPU, concurrency 1,2,8 (checks the script)")
    ap.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results"))
    args = ap.parse_args()
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    counts = [int(n) for n in args.requests.split(",")]
    if len(counts) != len(concurrencies):
        ap.error("--requests needs one count per --concurrency")
    lo, hi = (int(x) for x in args.prompt.split(","))
    if args.tiny:  # CPU-sized: 8 slots compile in a fraction of 64's time
        lo, hi, args.new = min(lo, 32), min(hi, 64), min(args.new, 16)
        concurrencies, counts = [1, 2, 8], [4, 8, 16]
    raw = hf_config_dict("qwen3_5", *TINY_CONFIGS["qwen3_5"]) if args.tiny else released_config(args.model)
    device = jax.devices()[0].device_kind

    with tempfile.TemporaryDirectory() as tmp:
        model = build_model(raw, jnp.float32 if args.tiny else jnp.bfloat16, pathlib.Path(tmp))
        # One prompt bucket: prompts shorter than hi pad to it, in both modes alike.
        model.configure(max_batch=max(concurrencies), max_len=hi + args.new + 8, prompt_buckets=(hi,))
        vocab = model.config.text.vocab_size
        rng = np.random.default_rng(0)
        workloads = [[random_text_request(rng, vocab, int(rng.integers(lo, hi + 1)), args.new) for _ in range(n)]
                     for n in counts]
        warmup = [random_text_request(rng, vocab, hi, WARMUP_NEW) for _ in range(max(concurrencies))]
        compile_s = model.engine().warmup(progress=False, vision=False)
        programs = model.engine().compiled_programs()
        print(f"{device}: {args.model}{' (tiny)' if args.tiny else ''}, compiled in {compile_s:.1f} s", flush=True)

        # In-process first: the online engine, once started, alone drives the engine's slots. One scheduler
        # for every run, as the online engine keeps one (its streamed call sizes carry over).
        scheduler = Scheduler(model.engine(), stream=True)
        run_in_process(scheduler, warmup, len(warmup), args.max_seconds)  # first runs: module loads
        in_process = []
        for c, w in zip(concurrencies, workloads):
            before = scheduler.decode_calls, scheduler.host_gap_s
            in_process.append(summarise(run_in_process(scheduler, w, c, args.max_seconds), len(w) * args.new))
            in_process[-1].update(host_gaps(before, (scheduler.decode_calls, scheduler.host_gap_s)))
        for c, s in zip(concurrencies, in_process):
            print(json.dumps(dict(concurrency=c, in_process=s)), flush=True)

        served = []
        spawn = multiprocessing.get_context("spawn")
        with serving(model) as url, concurrent.futures.ProcessPoolExecutor(1, mp_context=spawn) as client:
            def remote(requests: list[Request], concurrency: int, new: int) -> list[Trace]:
                prompts = [r.input_ids.tolist() for r in requests]
                return client.submit(load, url, prompts, new, concurrency, args.max_seconds).result()

            remote(warmup, len(warmup), WARMUP_NEW)  # the client's imports, the server's first requests
            for c, w in zip(concurrencies, workloads):
                before = engine_counters(url)
                served.append(summarise(remote(w, c, args.new), len(w) * args.new))
                served[-1].update(host_gaps(before, engine_counters(url)))
                print(json.dumps(dict(concurrency=c, server=served[-1])), flush=True)
        # A compilation while timing would be in the figures: the warm-up must have compiled every program.
        recompiled = model.engine().compiled_programs() - programs

    rows = [dict(concurrency=c, server=s, in_process=p, overhead_pct=100 * (1 - s["tok_s"] / p["tok_s"]),
                 ttft_overhead_ms=s["ttft_ms_p50"] - p["ttft_ms_p50"])
            for c, s, p in zip(concurrencies, served, in_process)]
    print(f"\n{'C':>3} {'mode':>10} {'req':>4} {'tokens':>7} {'tok/s':>9} {'TTFT p50':>9} {'p99':>8} {'ITL p50':>8} "
          f"{'p99':>8} {'tok/chunk':>9} {'gap ms':>7} {'overhead':>9} {'TTFT +ms':>8}")
    for r in rows:
        for mode in ("in_process", "server"):
            m = r[mode]
            extra = f" {r['overhead_pct']:>8.1f}% {r['ttft_overhead_ms']:>8.2f}" if mode == "server" else ""
            print(f"{r['concurrency']:>3} {mode:>10} {m['requests']:>4} {m['tokens']:>7} {m['tok_s']:>9.1f} "
                  f"{m['ttft_ms_p50']:>9.2f} {m['ttft_ms_p99']:>8.2f} {m['itl_ms_p50']:>8.2f} {m['itl_ms_p99']:>8.2f} "
                  f"{m['tokens_per_chunk']:>9.2f} {m['host_gap_ms_per_call']:>7.2f}{extra}")
    result = dict(**run_info(), tiny=args.tiny, model=args.model, config=raw, prompt=[lo, hi], new=args.new,
                  max_seconds=args.max_seconds, engine=dataclasses.asdict(model.engine().config),
                  compile_s=compile_s, compiled_while_timing=recompiled, rows=rows)
    print(f"programs compiled while timing: {recompiled}")
    write_result(args.out, "serve", result, tiny=args.tiny)


if __name__ == "__main__":
    main()
