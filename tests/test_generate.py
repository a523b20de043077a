"""generate() and the engine: greedy parity with HF generate for every family (text, image, mixed batch), chunked
prefill, padding isolation, zero recompilation and no device->host traffic but tokens in steady state."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import types

import jax
import numpy as np
import pytest

import qwenvl_jax as qj
import qwenvl_jax.engine as engine_module
from qwenvl_jax.engine import Engine, EngineConfig, Request, Scheduler, vision_bucket
from qwenvl_jax.generate import build_requests
from qwenvl_jax.sampling import SamplingParams
from tests.compilations import compilations
from tests.hf_tiny import build_hf_checkpoint

torch = pytest.importorskip("torch")

FAMILIES = ["qwen2_5_vl-a", "qwen3_vl-b", "qwen3_vl_moe-a", "qwen3_5-a", "qwen3_5_moe-b"]
NEW_TOKENS = 24
# A patch bucket that is not a power of two (48): the images below pad to it, and their tokens still equal HF's.
ENGINE = dict(max_batch=2, max_len=160, prompt_buckets=(96,), decode_steps=8, vision_buckets=(48,),
              chunked_prefill=False)
IMAGE = np.random.default_rng(1).integers(0, 256, (50, 90, 3), dtype=np.uint8)


def tiny_checkpoint(variant: str, directory):
    """(HF model, our model) over a tiny random checkpoint with tokenizer and processor files."""
    return build_hf_checkpoint(variant, directory), qj.load(directory, dtype="float32")


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request, tmp_path_factory):
    hf, ours = tiny_checkpoint(request.param, tmp_path_factory.mktemp(request.param))
    ours.configure(**ENGINE)
    ours.warmup(progress=False)
    return hf, ours


def _hf_greedy(hf, ours, input_ids: np.ndarray, attention_mask: np.ndarray | None = None, **vision) -> list[list]:
    eos = list(ours.eos_token_ids())
    kwargs = {k: torch.tensor(v) for k, v in vision.items() if v is not None}
    mask = np.ones_like(input_ids) if attention_mask is None else attention_mask
    with torch.no_grad():
        out = hf.generate(input_ids=torch.tensor(input_ids), attention_mask=torch.tensor(mask), do_sample=False,
                          max_new_tokens=NEW_TOKENS, eos_token_id=eos, pad_token_id=eos[0], **kwargs)
    rows = []
    for row in out[:, input_ids.shape[1]:].tolist():
        stop = next((i for i, t in enumerate(row) if t in eos), None)
        rows.append(row if stop is None else row[: stop + 1])
    return rows


def test_text_batch_of_mixed_lengths_matches_hf(pair):
    hf, ours = pair
    processor = ours.processor
    prompts = ["Hi.", "Write a long, long story about a very small tiny checkpoint please.", "Two words"]
    out = processor([[{"role": "user", "content": [{"type": "text", "text": p}]}] for p in prompts])
    want = _hf_greedy(hf, ours, out.input_ids, out.attention_mask)
    rows = [ids[mask.astype(bool)].tolist() for ids, mask in zip(out.input_ids, out.attention_mask)]
    got = ours.generate(input_ids=rows, max_new_tokens=NEW_TOKENS)  # 3 requests on 2 slots: admission mid-run
    assert [r.token_ids for r in got] == want
    assert all(len(r.token_ids) == NEW_TOKENS or r.finish_reason == "stop" for r in got)


def test_image_request_matches_hf(pair):
    hf, ours = pair
    out = ours.processor([[{"role": "user", "content": [{"type": "image", "image": IMAGE},
                                                        {"type": "text", "text": "Describe it."}]}]])
    vision = dict(pixel_values=out.pixel_values, image_grid_thw=out.image_grid_thw)
    want = _hf_greedy(hf, ours, out.input_ids, mm_token_type_ids=out.mm_token_type_ids, **vision)
    got = ours.generate(input_ids=out.input_ids[0].tolist(), max_new_tokens=NEW_TOKENS, **vision)
    assert got.stats.prompt_tokens == out.input_ids.shape[1]
    assert got.token_ids == want[0]
    # The same request through chat messages (our processor end to end).
    again = ours.generate([{"role": "user", "content": [{"type": "image", "image": IMAGE},
                                                        {"type": "text", "text": "Describe it."}]}],
                          max_new_tokens=NEW_TOKENS)
    assert again.token_ids == want[0]


# ------------------------------------------------------------------------------------- one family, engine checks


@pytest.fixture(scope="module")
def qwen3_5(tmp_path_factory):
    return tiny_checkpoint("qwen3_5-a", tmp_path_factory.mktemp("engine"))


def _text_request(ids, max_new: int = NEW_TOKENS, **sampling) -> Request:
    ids = np.asarray(ids, np.int32)
    return Request(ids, np.broadcast_to(np.arange(len(ids), dtype=np.int32), (3, len(ids))).copy(), 0,
                   SamplingParams(**sampling), max_new)


def _engine(model, **options) -> Engine:
    config = EngineConfig(**{**ENGINE, **options})
    return Engine(model.graphdef, model.params, config,
                  eos_ids=model.eos_token_ids())


def _run(engine: Engine, requests) -> list[list[int]]:
    out = [[] for _ in requests]
    for ev in engine.run(requests):
        out[ev.request_index] += ev.tokens
    return out


def test_chunked_prefill_equals_one_shot(qwen3_5):
    hf, ours = qwen3_5
    prompt = np.random.default_rng(5).integers(0, 400, 45)
    chunked = _engine(ours, prompt_buckets=(16,), chunked_prefill=True, max_batch=1)
    one_shot = _engine(ours, prompt_buckets=(96,), max_batch=1)
    first = [e._prefill_request(_text_request(prompt), 0) for e in (chunked, one_shot)]
    assert int(first[0][0]) == int(first[1][0])
    for a, b in zip(jax.tree_util.tree_leaves(chunked.state.layers), jax.tree_util.tree_leaves(one_shot.state.layers)):
        np.testing.assert_allclose(np.asarray(a)[0], np.asarray(b)[0], rtol=1e-5, atol=1e-5)
    tokens = _run(chunked, [_text_request(prompt)])
    assert tokens[0] == _hf_greedy(hf, ours, prompt[None])[0]


def test_request_alone_equals_request_in_a_batch(qwen3_5):
    _, ours = qwen3_5
    rng = np.random.default_rng(6)
    prompts = [rng.integers(0, 400, n) for n in (9, 30, 17, 3)]
    engine = _engine(ours, max_batch=3)
    alone = _run(engine, [_text_request(prompts[1])])[0]
    batch = _run(engine, [_text_request(p, max_new=n) for p, n in zip(prompts, (5, NEW_TOKENS, 11, 20))])
    assert batch[1] == alone


def test_prompts_admitted_together_share_prefill_calls(qwen3_5):
    """Five text prompts of one bucket, admitted together: one 4-row prefill call and one 1-row call (programs
    warm-up compiled), each request's tokens those it gets alone."""
    _, ours = qwen3_5
    rng = np.random.default_rng(10)
    prompts = [rng.integers(0, 400, n) for n in (9, 30, 17, 3, 44)]
    engine = _engine(ours, max_batch=5)
    alone = [_run(engine, [_text_request(p)])[0] for p in prompts]
    engine.warmup(progress=False, vision=False)
    compiled = engine.compiled_programs()
    calls, prefill = [], engine._prefill
    engine._prefill = lambda *args, **kwargs: (calls.append(args[2].shape), prefill(*args, **kwargs))[1]
    together = _run(engine, [_text_request(p) for p in prompts])
    engine._prefill = prefill
    assert together == alone
    assert calls == [(4, 96), (1, 96)]
    assert engine.compiled_programs() == compiled


class _TransferRecorder:
    """Records device->host reads (any path through ``ArrayImpl._value``: device_get, int(), tolist(), ...) and
    decode dispatches, in order. The CPU backend has no transfer guard to trip; on a GPU the guard trips too."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.events: list[tuple[str, tuple]] = []

    @contextlib.contextmanager
    def watching(self):
        from jax._src.array import ArrayImpl

        value = ArrayImpl._value
        decode = self.engine._decode

        def dispatch(*args, **kwargs):
            self.events.append(("dispatch", ()))
            return decode(*args, **kwargs)

        ArrayImpl._value = property(lambda arr: (self.events.append(("read", arr.shape)), value.fget(arr))[1])
        self.engine._decode = dispatch
        try:
            with jax.transfer_guard_device_to_host("disallow"):
                yield self
        finally:
            ArrayImpl._value = value
            self.engine._decode = decode


def test_steady_state_compiles_nothing_and_moves_only_tokens(qwen3_5):
    _, ours = qwen3_5
    engine = _engine(ours, prompt_buckets=(16, 64), chunked_prefill=True, max_batch=2)
    ours._engine = engine  # build_requests below reads the model's processor; the engine is this one
    engine.warmup(progress=False)
    compiled = engine.compiled_programs()
    rng = np.random.default_rng(7)
    mixed = [_text_request(rng.integers(0, 400, n), max_new=m, temperature=t, top_p=0.9, seed=1)
             for n, m, t in ((5, 9, 0.0), (40, 17, 0.7), (100, 4, 0.0), (12, 30, 1.0))]
    for size in ((50, 90), (100, 36), (64, 64)):  # single images of different sizes, between text requests
        image = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
        request, _ = build_requests(ours, [{"role": "user", "content": [{"type": "image", "image": image},
                                                                        {"type": "text", "text": "Hm?"}]}],
                                    images=None, videos=None, input_ids=None, vision_arrays={},
                                    sampling=SamplingParams(), max_new_tokens=6)
        mixed.insert(2, request[0])
    mixed.append(dataclasses.replace(mixed[-2], max_new_tokens=5))  # the 100-token prompt again: a prefix cache hit
    recorder = _TransferRecorder(engine)
    with compilations() as compiles, recorder.watching():
        _run(engine, mixed)
    assert engine.compiled_programs() == compiled and compiles.count == 0, "steady state must not compile"
    assert engine.prefix.stats()["hit_tokens"] >= 64
    steps = engine.config.decode_steps
    reads = [shape for kind, shape in recorder.events if kind == "read"]
    assert reads and set(reads) <= {(1,), (steps, 1, 1), (steps, 2, 1)}, reads  # first tokens and decode tokens
    assert sum(shape == (1,) for shape in reads) == len(mixed)
    # The host reads a decode call's tokens only after dispatching the next call.
    first_decode_read = next(i for i, (kind, shape) in enumerate(recorder.events)
                             if shape in {(steps, 1, 1), (steps, 2, 1)})
    assert sum(kind == "dispatch" for kind, _ in recorder.events[:first_decode_read]) >= 2


@pytest.mark.parametrize("interval_ms, most", [(1e-3, 1), (1e6, 8)])
def test_streaming_sizes_decode_calls_by_the_interval_with_the_same_program_and_tokens(qwen3_5, interval_ms, most):
    """Streamed, decode calls are sized from the measured step time to end every stream_interval_ms: a tiny
    interval gives one-token calls, a huge one grows them to decode_steps after the first (one-token) call. The
    tokens and the compiled programs are a plain run's; every call is read before the next goes out."""
    _, ours = qwen3_5
    prompts = [np.random.default_rng(9).integers(0, 400, n) for n in (11, 26)]
    engine = _engine(ours, max_batch=2, decode_steps=8, stream_interval_ms=interval_ms)
    plain = _run(engine, [_text_request(p, max_new=20) for p in prompts])
    compiled = engine.compiled_programs()
    streamed = [[] for _ in prompts]
    sizes = []
    recorder = _TransferRecorder(engine)
    with recorder.watching():
        for ev in engine.run([_text_request(p, max_new=20) for p in prompts], stream=True):
            streamed[ev.request_index] += ev.tokens
            sizes.append(len(ev.tokens))
    assert streamed == plain
    assert max(sizes) == most and sizes.count(most) >= 2
    assert engine.compiled_programs() == compiled
    # First tokens are read before any decode call goes out, and each call is read before the next goes out.
    kinds = [kind for kind, _ in recorder.events]
    assert kinds[:2] == ["read", "read"] and kinds[2] == "dispatch"
    assert all(a != b for a, b in zip(kinds[2:], kinds[3:])), kinds


class _DeviceClock:
    """The Scheduler's clock, made of its reads: a decode call read takes ``step_ms`` for each step it ran (a step
    with a token), plus ``late_ms`` on the reads ``late(read index)`` picks; nothing else takes time."""

    def __init__(self, monkeypatch, step_ms: float, late_ms: float = 0.0, late=lambda read: False):
        self.now, self.reads = 0.0, itertools.count()
        device_get = jax.device_get

        def read(x):
            got = device_get(x)
            if np.ndim(got) == 3:  # a decode call's tokens [steps, rows, tokens a step]
                ran = int((got[..., 0] >= 0).any(axis=1).sum())
                self.now += (step_ms * ran + (late_ms if late(next(self.reads)) else 0.0)) / 1e3
            return got

        monkeypatch.setattr(jax, "device_get", read)
        monkeypatch.setattr(engine_module, "time", types.SimpleNamespace(perf_counter=lambda: self.now))


def _streamed_sizes(engine: Engine, requests) -> tuple[list[list[int]], list[list[int]]]:
    """Each request's tokens and the token count of each of its events, streamed."""
    tokens, sizes = [[] for _ in requests], [[] for _ in requests]
    for ev in engine.run(requests, stream=True):
        tokens[ev.request_index] += ev.tokens
        sizes[ev.request_index].append(len(ev.tokens))
    return tokens, sizes


def test_a_late_read_does_not_shrink_the_streamed_calls_after_it(qwen3_5, monkeypatch):
    """Every other read returns 300 ms late (as when a server's event loop holds the GIL as the tokens arrive):
    the calls after one are still sized from the device's step time, the least of the recent calls' (a one-step
    call, 4-step ones once a read on time has measured 10 ms a step), not cut to one step after each late read."""
    _, ours = qwen3_5
    engine = _engine(ours, max_batch=2, decode_steps=4, stream_interval_ms=100.0)
    prompt = np.random.default_rng(10).integers(0, 400, 12)
    plain = _run(engine, [_text_request(prompt, max_new=40)])
    _DeviceClock(monkeypatch, step_ms=10.0, late_ms=300.0, late=lambda read: read % 2 == 0)
    tokens, (sizes,) = _streamed_sizes(engine, [_text_request(prompt, max_new=40)])
    assert tokens == plain
    # The first token, a one-step call read late, a one-step call read on time, then 4-step calls to the end.
    assert sizes == [1, 1, 1] + [4] * 9 + [1], sizes


def test_a_call_that_ends_early_is_timed_by_the_steps_it_ran(qwen3_5, monkeypatch):
    """One slot, two requests: the first ends one step into a two-step call. That call took one step's time, not
    half a step's a step, so the second request's calls stay at two steps (20 ms of a 25 ms interval)."""
    _, ours = qwen3_5
    engine = _engine(ours, max_batch=1, decode_steps=8, stream_interval_ms=25.0)
    prompts = [np.random.default_rng(11).integers(0, 400, n) for n in (9, 14)]
    plain = _run(engine, [_text_request(p, max_new=n) for p, n in zip(prompts, (5, 12))])
    _DeviceClock(monkeypatch, step_ms=10.0)
    tokens, sizes = _streamed_sizes(engine, [_text_request(p, max_new=n) for p, n in zip(prompts, (5, 12))])
    assert tokens == plain
    # The first token, a one-step call (which measures the step), two-step calls, the last cut to one by the end.
    assert sizes == [[1, 1, 2, 1], [1, 2, 2, 2, 2, 2, 1]], sizes


def test_a_slot_freed_and_not_refilled_makes_the_next_streamed_call_short(qwen3_5, monkeypatch):
    """Two slots: when the first request ends and no request takes its slot, the next call is a quarter of the
    interval (2 steps of 10 ms, of 100), so a request sent on that end would join within it; then whole calls."""
    _, ours = qwen3_5
    engine = _engine(ours, max_batch=2, decode_steps=8, stream_interval_ms=100.0)
    prompts = [np.random.default_rng(12).integers(0, 400, n) for n in (10, 17)]
    requests = [_text_request(p, max_new=n) for p, n in zip(prompts, (10, 30))]
    plain = _run(engine, requests)
    _DeviceClock(monkeypatch, step_ms=10.0)
    tokens, sizes = _streamed_sizes(engine, requests)
    assert tokens == plain
    # First tokens, a one-step call, an 8-step call that ends the first request, the short call, whole calls.
    assert sizes == [[1, 1, 8], [1, 1, 8, 2, 8, 8, 2]], sizes


def test_a_stream_counts_its_decode_calls_and_the_host_time_between_them(qwen3_5, monkeypatch):
    """The caller takes 5 ms over each event: every decode call after the first (dispatched with the prefill's
    admission) follows 5 ms of host time with the device idle, and the scheduler counts it."""
    _, ours = qwen3_5
    engine = _engine(ours, max_batch=2, decode_steps=4, stream_interval_ms=100.0)
    clock = _DeviceClock(monkeypatch, step_ms=10.0)
    scheduler = Scheduler(engine, [_text_request(np.random.default_rng(13).integers(0, 400, 15), max_new=20)],
                          stream=True)
    events = 0
    for _ in scheduler.events():
        events += 1
        clock.now += 0.005
    assert scheduler.decode_calls == events - 1  # one event for the first token, one a decode call
    assert scheduler.host_gap_s == pytest.approx(0.005 * (scheduler.decode_calls - 1))


def test_requests_ending_at_their_first_token_run_no_decode_call(qwen3_5):
    _, ours = qwen3_5
    rng = np.random.default_rng(8)
    prompts = [rng.integers(0, 400, n) for n in (7, 20, 33)]
    engine = _engine(ours, max_batch=2)
    longer = _run(engine, [_text_request(p, max_new=3) for p in prompts])
    recorder = _TransferRecorder(engine)
    with recorder.watching():
        firsts = _run(engine, [_text_request(p, max_new=1) for p in prompts])
    assert firsts == [row[:1] for row in longer]
    assert not any(kind == "dispatch" for kind, _ in recorder.events)
    # Mixed: the one-token request still ends after its first token; the other decodes as it would alone.
    mixed = _run(engine, [_text_request(prompts[0], max_new=1), _text_request(prompts[1], max_new=3)])
    assert mixed == [longer[0][:1], longer[1]]


def test_vision_buckets_pad_by_at_most_a_third_past_the_configured_ones():
    buckets = (256, 1024, 4096)
    assert [vision_bucket(n, buckets) for n in (4, 256, 260, 4096)] == [256, 256, 1024, 4096]
    # Beyond: the least 2^k or 3 * 2^(k - 2); a 1024 x 1024 image (5476 Qwen2.5-VL patches) pads to 6144, not 8192.
    assert [vision_bucket(n, buckets) for n in (4100, 5476, 6144, 6148, 21904)] == [6144, 6144, 6144, 8192, 24576]
    assert [vision_bucket(n, (4,)) for n in (8, 12, 16, 20)] == [8, 12, 16, 24]
    with pytest.raises(ValueError, match="multiples of 4"):
        EngineConfig(vision_buckets=(50,))


def test_warmup_leaves_real_slots_untouched(qwen3_5):
    _, ours = qwen3_5
    engine = _engine(ours, max_batch=2)
    engine.warmup(progress=False)
    real = slice(0, engine.config.max_batch)
    for leaf in jax.tree_util.tree_leaves(engine.state.layers):
        assert not np.asarray(leaf)[real].any()
    assert not np.asarray(engine.state.lengths)[real].any() and not np.asarray(engine.state.active).any()


def test_generate_api_errors_and_stop_strings(qwen3_5):
    _, ours = qwen3_5
    ours.configure(**ENGINE)
    for kwargs, message in [(dict(temperature=-1.0), "temperature must be >= 0"),
                            (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
                            (dict(top_k=-2), "top_k must be a non-negative integer"),
                            (dict(max_new_tokens=0), "max_new_tokens must be a positive integer")]:
        with pytest.raises(ValueError, match=message):
            ours.generate("hello", **kwargs)
    with pytest.raises(ValueError, match="max_len is 160"):
        ours.generate(input_ids=list(range(200)))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        ours.generate(input_ids=[1, 2, 10**6])

    full = ours.generate("Say something.", max_new_tokens=NEW_TOKENS)
    stream = ours.generate("Say something.", max_new_tokens=NEW_TOKENS, stream=True)
    deltas = list(stream)
    assert "".join(deltas) == full.text and full.stats.new_tokens == len(full.token_ids)
    cut = full.text[3:6]
    stopped = ours.generate("Say something.", max_new_tokens=NEW_TOKENS, stop=[cut])
    assert stopped.finish_reason == "stop" and stopped.text == full.text[: full.text.index(cut)]
    sampled = [ours.generate("Say something.", max_new_tokens=8, temperature=1.0, seed=s).token_ids for s in (1, 1, 2)]
    assert sampled[0] == sampled[1] != sampled[2]


def test_image_prompts_prefilled_in_chunks_and_decoded_together_match_hf(pair):
    """Two image prompts of different image sizes (so different rope deltas), each prefilled in chunks of 8
    tokens with its vision tokens straddling chunk boundaries, then decoded in one batch: each equals HF alone."""
    hf, ours = pair
    images = [IMAGE, np.random.default_rng(2).integers(0, 256, (150, 60, 3), dtype=np.uint8)]
    requests, wants = [], []
    for image in images:
        out = ours.processor([[{"role": "user", "content": [{"type": "image", "image": image},
                                                            {"type": "text", "text": "Describe it."}]}]])
        vision = dict(pixel_values=out.pixel_values, image_grid_thw=out.image_grid_thw)
        wants.append(_hf_greedy(hf, ours, out.input_ids, mm_token_type_ids=out.mm_token_type_ids, **vision)[0])
        request, _ = build_requests(ours, None, images=None, videos=None, input_ids=out.input_ids[0].tolist(),
                                    vision_arrays=vision, sampling=SamplingParams(), max_new_tokens=NEW_TOKENS)
        assert len(request[0].input_ids) > 3 * 8 and request[0].vision is not None
        requests += request
    assert requests[0].rope_delta != requests[1].rope_delta
    engine = _engine(ours, prompt_buckets=(8,), chunked_prefill=True, max_batch=2)
    assert _run(engine, requests) == wants


def test_prefix_cache_repeats_and_suffixes_match_hf(pair):
    """A prompt, the same prompt again and the prompt plus a suffix: the later ones reuse the first's state from
    the prefix cache and still equal HF."""
    hf, ours = pair
    prompt = np.random.default_rng(7).integers(0, 400, 40)
    longer = np.concatenate([prompt, np.random.default_rng(8).integers(0, 400, 7)])
    wants = [_hf_greedy(hf, ours, p[None])[0] for p in (prompt, longer)]
    ours.clear_prefix_cache()
    assert [ours.generate(input_ids=p.tolist(), max_new_tokens=NEW_TOKENS).token_ids
            for p in (prompt, prompt, longer)] == [wants[0], wants[0], wants[1]]
    # A hybrid model has no snapshot inside the repeated prompt (one bucket, no chunks): the repeat prefills all
    # of it, and the suffix resumes at the prompt's end. An attention-only one reuses all but the last token.
    hybrid = ours.engine().prefix.hybrid
    assert ours.prefix_cache_stats()["hit_tokens"] == (40 if hybrid else 39 + 40)


def test_multi_turn_chat_with_an_image_reuses_the_conversation(pair):
    """Four chat turns, an image in the first: every later turn is prefilled after the longest cached prefix
    (past the image) and each equals HF on the same conversation."""
    hf, ours = pair
    ours.configure(**{**ENGINE, "max_len": 512, "chunked_prefill": True})  # the conversation outgrows 160
    try:
        messages, hits = [], []
        for i, question in enumerate(["Describe it.", "Why?", "And then?", "Thanks, bye."]):
            image = [{"type": "image", "image": IMAGE}] if i == 0 else []
            messages.append({"role": "user", "content": image + [{"type": "text", "text": question}]})
            out = ours.processor([messages])
            want = _hf_greedy(hf, ours, out.input_ids, mm_token_type_ids=out.mm_token_type_ids,
                              pixel_values=out.pixel_values, image_grid_thw=out.image_grid_thw)[0]
            before = ours.prefix_cache_stats()["hit_tokens"]
            result = ours.generate(messages, max_new_tokens=NEW_TOKENS)
            hits.append(result.stats.cached_tokens)
            assert hits[-1] == ours.prefix_cache_stats()["hit_tokens"] - before
            assert result.token_ids == want, f"turn {i + 1}"
            if i == 0:
                image_end = 1 + int(np.flatnonzero(out.input_ids[0] == ours.config.image_token_id).max())
            messages.append({"role": "assistant", "content": [{"type": "text", "text": result.text}]})
        assert hits[0] == 0 and all(h >= image_end for h in hits[1:]), (hits, image_end)
    finally:
        ours.configure(**ENGINE)


def test_a_hit_ending_inside_an_image_prefills_the_rest_of_it(pair):
    """Two questions about one image, prefilled in chunks of 8: the second resumes from the first's cached state
    (a hybrid model at the chunk snapshot inside the image's tokens, whose vision tokens past it come from the
    tower again) and both equal HF."""
    hf, ours = pair
    requests, wants = [], []
    for question in ("Describe it.", "Colours?"):  # they part right after the image
        out = ours.processor([[{"role": "user", "content": [{"type": "image", "image": IMAGE},
                                                            {"type": "text", "text": question}]}]])
        vision = dict(pixel_values=out.pixel_values, image_grid_thw=out.image_grid_thw)
        wants.append(_hf_greedy(hf, ours, out.input_ids, mm_token_type_ids=out.mm_token_type_ids, **vision)[0])
        request, _ = build_requests(ours, None, images=None, videos=None, input_ids=out.input_ids[0].tolist(),
                                    vision_arrays=vision, sampling=SamplingParams(), max_new_tokens=NEW_TOKENS)
        requests += request
    engine = _engine(ours, prompt_buckets=(8,), chunked_prefill=True, max_batch=2)
    assert [_run(engine, [r])[0] for r in requests] == wants
    image = np.flatnonzero(requests[0].input_ids == ours.config.image_token_id)
    hit = engine.prefix.stats()["hit_tokens"]
    assert hit > 0
    if engine.prefix.hybrid:
        assert image[0] < hit <= image[-1], (hit, image)  # the snapshot sits inside the image's tokens


def test_the_first_request_after_warmup_compiles_nothing(qwen3_5, tmp_path):
    """A converted checkpoint restores committed parameters: the decode state (and the prefix pool) must be
    committed too, else warm-up's first program is compiled again for the first request (3.7 s of the demo's
    first TTFT was that)."""
    from convert.converter import convert_checkpoint

    _, ours = qwen3_5
    convert_checkpoint(ours.path, tmp_path / "converted", dtype="float32")
    model = qj.load(tmp_path / "converted")
    model.configure(max_batch=1, max_len=128, prompt_buckets=(64,), decode_steps=8, chunked_prefill=False)
    model.engine().warmup(progress=False, vision=False)
    with compilations() as compiles:
        for _ in range(2):  # the second from the prefix cache
            model.generate(input_ids=list(range(3, 40)), max_new_tokens=4)
    assert compiles.count == 0
