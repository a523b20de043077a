"""Prefix caching: the host index (pages, snapshots, LRU eviction) on its own, then a hybrid model's engine: chunk
snapshots and the fallback to the last one, requests sharing a system prompt admitted together, eviction under a
tiny budget, the slot's state after a hit against a cold prefill. (Every family's repeats, suffixes and a
multi-turn chat with an image are in tests/test_generate.py.)"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from qwenvl_jax.engine import Engine, EngineConfig, Request, VisionPayload
from qwenvl_jax.prefix_cache import PrefixCache, PrefixIndex, page_bytes, request_content, snapshot_bytes
from qwenvl_jax.sampling import SamplingParams

P = 4  # tokens per page in the index tests


def seq(*values: int) -> np.ndarray:
    return np.asarray(values, np.int64)


def test_attention_only_hit_is_the_longest_common_prefix_over_pages():
    index = PrefixIndex(8, 0, P, hybrid=False, mtp=False)
    first = index.insert(seq(*range(10)), 10, snapshot=True)
    assert first.src_pages == [0, 1, 2] and len(set(first.dst_pages)) == 3 and first.snapshot is None
    hit = index.lookup(seq(*range(7), 99, 98), limit=8)
    assert hit.tokens == 7 and hit.pages == first.dst_pages[:2]  # ends inside the second page
    assert index.lookup(seq(*range(12)), limit=11).tokens == 10
    assert index.lookup(seq(*range(10)), limit=9).tokens == 9  # one token is always left to prefill
    assert index.lookup(seq(5, 6), limit=1).tokens == 0
    # The last page held 2 tokens: a longer sequence extends it in place (same pool page, copied again).
    again = index.insert(seq(*range(11)), 11, snapshot=True)
    assert again.src_pages == [2] and again.dst_pages == first.dst_pages[2:]
    assert index.insert(seq(*range(9)), 9, snapshot=True).dst_pages == []  # covered by the longer page


def test_hybrid_hit_ends_at_the_last_snapshot_inside_the_match():
    index = PrefixIndex(8, 4, P, hybrid=True, mtp=False)
    content = seq(*range(12))
    index.insert(content, 4, snapshot=True)
    index.insert(content, 10, snapshot=True)
    assert index.lookup(content, limit=11).tokens == 10
    hit = index.lookup(seq(*range(9), 50, 51), limit=10)  # diverges at 9: falls back to the snapshot at 4
    assert (hit.tokens, len(hit.pages)) == (4, 1) and hit.snapshot is not None
    assert index.lookup(seq(1, 2, 3), limit=2).tokens == 0


def test_mtp_pages_are_passed_only_once_their_last_key_was_written():
    """The MTP head's keys lag one position: a page saved at a prompt's end lacks its last one, so a hit may end
    in that page but not pass it, until a longer sequence saves the page again."""
    index = PrefixIndex(8, 4, P, hybrid=True, mtp=True)
    content = seq(*range(12))
    first = index.insert(content, 8, snapshot=True)  # page [4, 8) ends at the prompt's end
    second = index.insert(content, 12, snapshot=True)
    assert index.lookup(content, limit=11).tokens == 8  # the snapshot at 12 is past limit; 8 is fine
    assert second.src_pages == [1, 2] and second.dst_pages[0] == first.dst_pages[1]  # page 1 copied again
    index2 = PrefixIndex(8, 4, P, hybrid=True, mtp=True)
    index2.insert(content, 8, snapshot=True)
    index2.insert(content, 8 + 2, snapshot=False)  # extends past page 1 but takes no snapshot at 10
    assert index2.lookup(content, limit=11).tokens == 8


def test_least_recently_used_pages_and_snapshots_are_evicted_leaves_first():
    index = PrefixIndex(3, 2, P, hybrid=True, mtp=False)
    a, b = seq(*range(8)), seq(*range(100, 108))
    index.insert(a, 8, snapshot=True)  # pages a0, a1 and one snapshot
    index.insert(b, 4, snapshot=True)  # page b0 and the second snapshot
    index.lookup(a, limit=8)  # a is the most recently used now
    out = index.insert(b, 8, snapshot=True)  # needs a page and a snapshot: b0 itself is protected, a1 goes
    assert len(out.dst_pages) == 1 and index.stats["evicted_pages"] == 1
    assert index.lookup(a, limit=8).tokens == 0  # a's snapshot went with its last page
    assert index.lookup(b, limit=8).tokens == 8
    full = PrefixIndex(1, 1, P, hybrid=True, mtp=False)  # one page: a two-page prefix caches its first only
    assert full.insert(a, 8, snapshot=True).dst_pages == [0] and full.insert(a, 8, snapshot=True).dst_pages == []
    assert full.stats["uncached_pages"] == 2 and full.lookup(a, limit=7).tokens == 0  # never fails: runs uncached


def test_content_hashes_pixels_so_only_the_same_image_matches():
    ids = np.array([1, 7, 7, 7, 7, 2], np.int32)
    pixels = np.random.default_rng(0).standard_normal((16, 3)).astype(np.float32)
    payload = VisionPayload(pixels, np.array([[1, 4, 4]]), np.arange(1, 5, dtype=np.int32))
    same = request_content(ids, payload, merge=2)
    other = request_content(ids, VisionPayload(pixels + 1, payload.grids_thw, payload.dest_t), merge=2)
    assert (same[[0, 5]] == ids[[0, 5]]).all() and (same[1:5] < 0).all() and len(set(same[1:5])) == 4
    assert (same == request_content(ids, payload, merge=2)).all() and (same[1:5] != other[1:5]).all()


# ----------------------------------------------------------------------------------------------- a hybrid engine

torch = pytest.importorskip("torch")
ENGINE = dict(max_batch=8, max_len=192, prompt_buckets=(16, 32), decode_steps=8, prefix_page_tokens=8)
NEW = 10


def _tiny_engine(variant: str, directory, mtp: bool = False) -> Engine:
    import qwenvl_jax as qj
    from tests.hf_tiny import add_mtp_weights, build_hf_checkpoint

    build_hf_checkpoint(variant, directory)
    if mtp:
        add_mtp_weights(directory)
    model = qj.load(directory, dtype="float32")
    return Engine(model.graphdef, model.params, EngineConfig(**ENGINE), eos_ids=model.eos_token_ids())


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    """Hybrid, with speculative decoding: the MTP head's pages and hidden states are cached too."""
    return _tiny_engine("qwen3_5-a", tmp_path_factory.mktemp("hybrid"), mtp=True)


@pytest.fixture(scope="module")
def attention_engine(tmp_path_factory):
    return _tiny_engine("qwen3_vl-b", tmp_path_factory.mktemp("attention"))


def _request(ids, max_new: int = NEW) -> Request:
    ids = np.asarray(ids, np.int32)
    return Request(ids, np.broadcast_to(np.arange(len(ids), dtype=np.int32), (3, len(ids))).copy(), 0,
                   SamplingParams(), max_new)


def _run(engine: Engine, prompts) -> list[list[int]]:
    out = [[] for _ in prompts]
    for ev in engine.run([_request(p) for p in prompts]):
        out[ev.request_index] += ev.tokens
    return out


def _cold(engine: Engine, prompt) -> list[int]:
    engine.prefix.clear()
    return _run(engine, [prompt])[0]


def test_hits_resume_at_chunk_snapshots_and_equal_cold_prefill(engine):
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, 400, 100)
    assert engine.chunk_tokens == 32 and engine.speculative_tokens > 0  # MTP pages and hidden states too
    variants = [prompt, np.concatenate([prompt, [3, 4, 5]]),  # a repeat, a repeat plus a suffix
                np.concatenate([prompt[:75], rng.integers(0, 400, 9)])]  # diverges mid-chunk: resumes at 64
    cold = [_cold(engine, v) for v in variants]
    engine.prefix.clear()
    assert _run(engine, [prompt])[0] == cold[0]
    hits = []
    for v, want in zip(variants, cold):
        before = engine.prefix.stats()["hit_tokens"]
        assert _run(engine, [v])[0] == want
        hits.append(engine.prefix.stats()["hit_tokens"] - before)
    assert hits == [96, 100, 64]  # chunk boundary below the last token; the prompt's end; the last boundary < 75

    # The slot after prefilling the repeat-plus-suffix from the cache equals a cold prefill (fp32).
    def state_after(clear: bool):
        if clear:
            engine.prefix.clear()
        engine._prefill_request(_request(variants[1]), 0)
        return jax.tree_util.tree_map(lambda x: np.asarray(x[0]), (engine.state.layers, engine.state.spec.mtp_layers))
    cold_state, hit_state = state_after(True), None
    engine._prefill_request(_request(prompt), 1)
    hit_state = state_after(False)
    n = len(variants[1])
    for a, b in zip(jax.tree_util.tree_leaves(cold_state), jax.tree_util.tree_leaves(hit_state)):
        if a.ndim == 3 and a.shape[0] == ENGINE["max_len"]:  # KV [max_len, heads, dim]: the filled positions
            a, b = a[: n - 1], b[: n - 1]
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["engine", "attention_engine"])
def test_requests_sharing_a_system_prompt_admitted_together_reuse_it(kind, request):
    engine = request.getfixturevalue(kind)
    rng = np.random.default_rng(1)
    system = rng.integers(0, 400, 70)
    prompts = [np.concatenate([system, rng.integers(0, 400, n)]) for n in (5, 12, 3, 20, 8, 1, 15, 9)]
    cold = [_cold(engine, p) for p in prompts]
    engine.prefix.clear()
    assert _run(engine, prompts) == cold  # eight concurrent requests, none sees another's tokens
    stats = engine.prefix.stats()
    assert stats["hits"] == 7  # the first is prefilled, the rest wait for it
    # A hybrid model resumes at the first's chunk snapshot, an attention-only one after the whole shared part.
    assert stats["hit_tokens"] == 7 * 64 if engine.prefix.hybrid else stats["hit_tokens"] >= 7 * 70


def test_eviction_under_a_tiny_budget_keeps_results_equal(engine):
    rng = np.random.default_rng(2)
    prompts = [rng.integers(0, 400, n) for n in (60, 90, 45)]
    cold = [_cold(engine, p) for p in prompts]
    full = engine.prefix
    try:  # a pool of 12 pages (one 90-token prompt) and 4 snapshots
        context = 24 * page_bytes(engine.state, 8) + 8 * snapshot_bytes(engine.state)
        engine.prefix = PrefixCache(engine.state, ENGINE["max_len"], 8, context // 2 + 64, 32)
        assert (engine.prefix.index.num_pages, engine.prefix.index.num_snapshots) == (12, 4)
        for p, want in zip(prompts, cold):
            assert _run(engine, [p])[0] == want
            assert _run(engine, [p])[0] == want
        stats = engine.prefix.stats()
        assert stats["evicted_pages"] > 0 and stats["hits"] == 3
        assert stats["pages_used"] == 12 and stats["snapshots_used"] <= 4
    finally:
        engine.prefix = full


def test_prefix_cache_options_are_checked():
    with pytest.raises(ValueError, match="prefix_snapshot_interval must be one of the prompt buckets"):
        EngineConfig(prompt_buckets=(16, 32), prefix_snapshot_interval=24)
    with pytest.raises(ValueError, match="prefix_page_tokens"):
        EngineConfig(prefix_page_tokens=0)
