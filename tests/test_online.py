"""The online engine in-process (tiny random checkpoint): requests that join a running batch or free a slot by
cancelling get exactly their tokens alone, backpressure, and an engine served by one loop at a time."""

from __future__ import annotations

import queue

import numpy as np
import pytest

import qwenvl_jax as qj
from qwenvl_jax.engine import Engine, EngineConfig, Request, Scheduler, TokenEvent
from qwenvl_jax.online import EngineClosed, OnlineEngine, QueueFull
from qwenvl_jax.sampling import SamplingParams
from qwenvl_jax.tiny_model import write_tiny_checkpoint

CONFIG = EngineConfig(max_batch=2, max_len=128, prompt_buckets=(32,), decode_steps=4)
PROMPTS = [np.random.default_rng(i).integers(0, 1000, n) for i, n in enumerate((9, 21, 14))]


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> Engine:
    hf_dir = tmp_path_factory.mktemp("online") / "hf"
    write_tiny_checkpoint(hf_dir, "qwen3_vl")
    model = qj.load(hf_dir, dtype="float32")
    # No end-of-sequence ids: every request runs to its max_new_tokens, so the counts below are exact.
    return Engine(model.graphdef, model.params, CONFIG)


def _request(ids: np.ndarray, max_new: int) -> Request:
    return Request(ids.astype(np.int32), np.broadcast_to(np.arange(len(ids), dtype=np.int32), (3, len(ids))).copy(),
                   0, SamplingParams(), max_new)


def _alone(engine: Engine, ids: np.ndarray, max_new: int) -> list[int]:
    return [t for ev in engine.run([_request(ids, max_new)]) for t in ev.tokens]


def test_a_slot_freed_by_a_cancel_hands_its_new_request_only_its_own_tokens(engine):
    """The first request is cancelled at its first token while a decode call for it is still queued on the
    device; the waiting third request takes its slot before that call is read, and gets none of its tokens."""
    scheduler = Scheduler(engine, [_request(p, 12) for p in PROMPTS])
    tokens: list[list[int]] = [[], [], []]
    reasons = [None, None, None]
    for ev in scheduler.events():
        tokens[ev.request_index] += ev.tokens
        reasons[ev.request_index] = ev.finish_reason
        if ev.request_index == 0 and ev.tokens:
            scheduler.cancel(0)
    assert reasons == ["cancelled", "length", "length"] and len(tokens[0]) == 1
    assert tokens[1:] == [_alone(engine, p, 12) for p in PROMPTS[1:]]


def test_requests_join_a_running_batch_and_leave_it(engine):
    alone = [_alone(engine, p, 30) for p in PROMPTS]
    online = OnlineEngine(engine, max_queue=1)
    events: queue.Queue[TokenEvent] = queue.Queue()
    try:
        with pytest.raises(RuntimeError, match="being served by an OnlineEngine"):
            engine.run([_request(PROMPTS[0], 2)])
        first = online.submit(_request(PROMPTS[0], 30), events.put)
        got = {first: []}
        while len(got[first]) < 5:  # decoding: the others join it
            got[first] += events.get(timeout=60).tokens
        second = online.submit(_request(PROMPTS[1], 30), events.put)
        third = online.submit(_request(PROMPTS[2], 30), events.put)  # waits: two slots
        with pytest.raises(QueueFull, match="all 2 decode slots are busy and 1 request waits"):
            online.submit(_request(PROMPTS[2], 30), events.put)
        got |= {second: [], third: []}
        ended = {}
        while len(ended) < 3:
            ev = events.get(timeout=60)
            got[ev.request_index] += ev.tokens
            if ev.finished:
                ended[ev.request_index] = ev.finish_reason
        assert [got[i] for i in (first, second, third)] == alone
        assert set(ended.values()) == {"length"} and online.running == 0 and online.waiting == 0

        # Cancelled while running, and while waiting: each ends at once with "cancelled", its slot free.
        running = [online.submit(_request(p, 90), events.put) for p in PROMPTS[:2]]
        waiting = online.submit(_request(PROMPTS[2], 90), events.put)
        started: set[int] = set()
        while started != set(running):
            started.add(events.get(timeout=60).request_index)
        assert online.running == 2 and online.waiting == 1
        for request_id in (waiting, *running):
            online.cancel(request_id)
        last = {}
        while len(last) < 3:
            ev = events.get(timeout=60)
            if ev.finished:
                last[ev.request_index] = ev.finish_reason
        assert last == dict.fromkeys((*running, waiting), "cancelled")
        assert online.running == 0 and online.waiting == 0
    finally:
        online.close()
    with pytest.raises(EngineClosed, match="shutting down"):
        online.submit(_request(PROMPTS[0], 2), events.put)
    assert _alone(engine, PROMPTS[0], 30) == alone[0]  # the engine runs requests again without the loop
