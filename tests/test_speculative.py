"""Speculative decoding with the MTP head (Qwen3.5, dense and MoE): exact greedy output whatever the drafts (the
real head with random weights, an oracle that proposes the target's own continuation, an oracle with errors), a
batch whose rows accept different numbers of drafts, the MTP drafts against a cache-free reference, speculative
sampling's distribution, and a steady state that compiles nothing and reads only tokens."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qwenvl_jax as qj
from qwenvl_jax.engine import Engine, EngineConfig, Request
from qwenvl_jax.generate import build_requests
from qwenvl_jax.models.context import full_sequence_context
from qwenvl_jax.models.rope import mrope_cos_sin
from qwenvl_jax.sampling import SamplingParams, process_logits, sampling_arrays, speculative_accept
from tests.hf_tiny import add_mtp_weights, build_hf_checkpoint

pytest.importorskip("torch")

# Dense and MoE, each with the other config switches of its pair (qwen3_5-b and qwen3_5_moe-a have tests below).
VARIANTS = ["qwen3_5-a", "qwen3_5_moe-b"]
NEW_TOKENS = 64
ENGINE = dict(max_batch=2, max_len=200, prompt_buckets=(64,), decode_steps=16, vision_buckets=(64,))
IMAGE = np.random.default_rng(1).integers(0, 256, (50, 90, 3), dtype=np.uint8)


def mtp_checkpoint(variant: str, directory):
    build_hf_checkpoint(variant, directory)
    add_mtp_weights(directory)
    return qj.load(directory, dtype="float32")


def _engine(model, **options) -> Engine:
    return Engine(model.graphdef, model.params, EngineConfig(**{**ENGINE, **options}), eos_ids=model.eos_token_ids())


def _text_request(ids, max_new: int = NEW_TOKENS, draft_tokens=None, **sampling) -> Request:
    ids = np.asarray(ids, np.int32)
    return Request(ids, np.broadcast_to(np.arange(len(ids), dtype=np.int32), (3, len(ids))).copy(), 0,
                   SamplingParams(**sampling), max_new, draft_tokens=draft_tokens)


def _image_request(model, max_new: int = NEW_TOKENS) -> Request:
    messages = [{"role": "user", "content": [{"type": "image", "image": IMAGE}, {"type": "text", "text": "Hm?"}]}]
    requests, _ = build_requests(model, messages, images=None, videos=None, input_ids=None, vision_arrays={},
                                 sampling=SamplingParams(), max_new_tokens=max_new)
    return requests[0]


def _run(engine: Engine, requests) -> tuple[list[list[int]], list[int]]:
    """(tokens, decode steps) per request."""
    tokens, steps = [[] for _ in requests], [0] * len(requests)
    for ev in engine.run(requests):
        tokens[ev.request_index] += ev.tokens
        steps[ev.request_index] += ev.steps
    return tokens, steps


def _with(req: Request, draft_tokens) -> Request:
    return Request(req.input_ids, req.positions, req.rope_delta, req.sampling, req.max_new_tokens, req.vision,
                   draft_tokens)


@pytest.fixture(scope="module", params=VARIANTS)
def model(request, tmp_path_factory):
    return mtp_checkpoint(request.param, tmp_path_factory.mktemp(request.param))


def test_greedy_output_is_unchanged_by_any_drafts(model):
    """k = 2. Text and image prompts with the MTP head's drafts (random weights: acceptance near 0), the oracle
    (the plain run's own tokens: every draft accepted, 3 tokens a step), the oracle with two wrong tokens, and a
    batch mixing an oracle row with an MTP row: the tokens are always the plain run's."""
    k = 2
    text = _text_request(np.random.default_rng(0).integers(0, 400, 40))
    image = _image_request(model)
    plain, plain_steps = _run(_engine(model, speculative_tokens=0), [text, image])
    assert all(len(t) > 20 for t in plain) and plain_steps == [len(t) - 1 for t in plain]
    engine = _engine(model, speculative_tokens=k)

    drafted, _ = _run(engine, [text, image])
    assert drafted == plain

    oracles = [np.concatenate([r.input_ids, t]) for r, t in zip((text, image), plain)]
    exact, steps = _run(engine, [_with(text, oracles[0]), _with(image, oracles[1])])
    assert exact == plain
    assert steps == [math.ceil((len(t) - 1) / (k + 1)) for t in plain]  # all drafts accepted

    wrong = oracles[0].copy()
    for at in (len(text.input_ids) + 5, len(text.input_ids) + 12):
        wrong[at] = (wrong[at] + 1) % 400
    mixed, mixed_steps = _run(engine, [_with(text, wrong), image])
    assert mixed == plain
    assert steps[0] < mixed_steps[0] < len(plain[0]) - 1


def test_tokens_per_step_and_acceptance_in_the_stats(tmp_path):
    """generate() reports tokens per step and draft acceptance with speculation (None without); a model with
    an MTP head speculates with k = 2 by default up to max_batch 8; k = 1 and 4 with an oracle stay exact."""
    model = mtp_checkpoint("qwen3_5-a", tmp_path)
    model.configure(**ENGINE, speculative_tokens=0)
    ids = np.random.default_rng(3).integers(0, 400, 30).tolist()
    plain = model.generate(input_ids=ids, max_new_tokens=40)
    plain_engine = model.engine()
    assert plain.stats.tokens_per_step is None and plain.stats.draft_acceptance is None
    model.configure(speculative_tokens=None)
    assert model.engine().speculative_tokens == 2
    model.configure(max_batch=16)
    assert model.engine().speculative_tokens == 0
    model.configure(max_batch=ENGINE["max_batch"], speculative_tokens=4)
    drafted = model.generate(input_ids=ids, max_new_tokens=40)
    assert drafted.token_ids == plain.token_ids
    assert 1.0 <= drafted.stats.tokens_per_step <= 5.0
    assert drafted.stats.draft_acceptance == pytest.approx((drafted.stats.tokens_per_step - 1) / 4)
    engines = {1: _engine(model, speculative_tokens=1), 4: model.engine()}
    for k, engine in engines.items():
        oracle = np.concatenate([ids, plain.token_ids])
        tokens, steps = _run(engine, [_text_request(ids, max_new=40, draft_tokens=oracle)])
        assert tokens[0] == plain.token_ids and steps[0] == math.ceil(39 / (k + 1))
    # Up to the end of the cache: drafts and verified tokens that would pass max_len are neither written nor
    # read, and the request ends where a plain one does.
    long_plain, _ = _run(plain_engine, [_text_request(ids, max_new=500)])
    assert len(ids) + len(long_plain[0]) == ENGINE["max_len"]
    oracle = np.concatenate([ids, long_plain[0]])
    for drafts in (None, oracle):
        assert _run(engines[4], [_text_request(ids, max_new=500, draft_tokens=drafts)])[0] == long_plain


def _reference_drafts(model, tokens: np.ndarray) -> np.ndarray:
    """MTP drafts from a cache-free pass over the whole sequence: entry i is the draft for position i + 2."""
    from flax import nnx

    net = nnx.merge(model.graphdef, model.params)
    lm = net.language_model
    n = len(tokens)
    ids = jnp.asarray(tokens, jnp.int32)[None]
    positions = jnp.broadcast_to(jnp.arange(n)[None, None], (3, 1, n))
    lengths = jnp.array([n], jnp.int32)
    embeds = lm.embed_tokens(ids)
    hidden = lm(embeds, positions, lengths)
    cos, sin = mrope_cos_sin(positions[:, :, : n - 1], lm.cfg)
    m, _ = net.mtp(embeds[:, 1:], hidden[:, :-1], full_sequence_context(cos, sin, lengths - 1), None)
    return np.asarray(jnp.argmax(net.lm_logits(m)[0], axis=-1))


def test_mtp_drafts_match_a_cache_free_reference(tmp_path):
    """k = 1, a 45-token prompt prefilled in 16-token chunks (MTP positions across chunk boundaries), then one
    step per call: after every step the draft equals the cache-free MTP pass's over the tokens so far (one pass
    over the final sequence: the MTP head is causal)."""
    model = mtp_checkpoint("qwen3_5-b", tmp_path)
    engine = _engine(model, speculative_tokens=1, prompt_buckets=(16,), max_batch=1)
    prompt = np.random.default_rng(4).integers(0, 400, 45).astype(np.int32)
    engine._prefill_request(_text_request(prompt), 0)
    sequence = list(prompt) + [int(engine.state.next_token[0])]
    host_active = np.zeros(2, bool)
    host_active[0] = True
    drafts = {}  # sequence length -> the engine's draft for the token after it
    for _ in range(12):
        drafts[len(sequence)] = int(engine.state.spec.drafts[0, 0])
        engine.state, out = engine._decode(engine._weights, engine.state, host_active, engine._eos, np.int32(1),
                                           steps=16, rows=1)
        sequence += [int(t) for t in np.asarray(out)[0, 0] if t >= 0]
    reference = _reference_drafts(model, np.array(sequence))  # entry i: the draft for position i + 2
    assert {n: d for n, d in drafts.items()} == {n: int(reference[n - 2]) for n in drafts}


def test_speculative_sampling_keeps_the_target_distribution():
    """speculative_accept on a 6-token vocabulary, 60k draws: the first emitted token follows p_0, the second
    (given the first draft was accepted) p_1, with the repetition penalty counting the first draft as seen."""
    vocab, k, draws = 6, 2, 60_000
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(1, k + 1, vocab)) * 1.5, jnp.float32)
    drafts = jnp.array([[1, 3]], jnp.int32)
    seen = jnp.zeros((1, vocab), bool).at[0, 4].set(True)
    params = sampling_arrays([SamplingParams(temperature=0.8, top_k=5, repetition_penalty=1.3)])
    keys = jax.random.split(jax.random.key(0), draws)
    tokens, emitted = jax.jit(jax.vmap(lambda key: speculative_accept(logits, drafts, params, key[None], seen)))(keys)
    tokens, emitted = np.asarray(tokens)[:, 0], np.asarray(emitted)[:, 0]

    def target(position: int, seen_ids: list[int]) -> np.ndarray:
        mask = jnp.zeros((1, vocab), bool).at[0, jnp.array(seen_ids)].set(True)
        return np.asarray(jax.nn.softmax(process_logits(logits[:, position], params, mask), axis=-1))[0]

    def close(observed: np.ndarray, expected: np.ndarray, n: int) -> None:
        # 5 standard errors per token: a miss is a real bias, not chance.
        assert np.all(np.abs(observed - expected) <= 5 * np.sqrt(expected * (1 - expected) / n) + 1e-9), \
            (observed, expected)

    close(np.bincount(tokens[:, 0], minlength=vocab) / draws, target(0, [4]), draws)
    first_accepted = tokens[:, 0] == 1
    assert np.array_equal(first_accepted, emitted >= 2)
    n = int(first_accepted.sum())
    close(np.bincount(tokens[first_accepted, 1], minlength=vocab) / n, target(1, [4, 1]), n)


def test_speculative_steady_state_compiles_nothing_and_reads_only_tokens(tmp_path):
    from tests.test_generate import _TransferRecorder

    model = mtp_checkpoint("qwen3_5_moe-a", tmp_path)
    assert _engine(model).speculative_tokens == 1, "an MoE model drafts one token a step by default"
    engine = _engine(model, speculative_tokens=2, prompt_buckets=(16, 64))
    engine.warmup(progress=False, vision=False)
    compiled = engine.compiled_programs()
    rng = np.random.default_rng(7)
    requests = [_text_request(rng.integers(0, 400, n), max_new=m, temperature=t, top_p=0.9, seed=1)
                for n, m, t in ((5, 9, 0.0), (40, 17, 0.7), (100, 4, 0.0), (12, 30, 1.0))]
    recorder = _TransferRecorder(engine)
    with recorder.watching():
        tokens, _ = _run(engine, requests)
    assert engine.compiled_programs() == compiled, "steady state must not compile"
    assert [len(t) for t in tokens] <= [9, 17, 4, 30] and all(0 <= x < 512 for t in tokens for x in t)
    reads = {shape for kind, shape in recorder.events if kind == "read"}
    assert reads <= {(1,), (16, 1, 3), (16, 2, 3)}, reads
    # Sampled requests are reproducible from their seed.
    assert _run(engine, requests)[0] == tokens


def test_speculation_needs_an_mtp_head_and_a_sane_k(tmp_path):
    build_hf_checkpoint("qwen3_5-a", tmp_path / "plain")
    plain = qj.load(tmp_path / "plain", dtype="float32")
    with pytest.raises(ValueError, match="MTP head"):
        _engine(plain, speculative_tokens=2)
    with pytest.raises(ValueError, match="speculative_tokens must be 0"):
        EngineConfig(speculative_tokens=5)


def test_mtp_head_is_converted_and_format_2_checkpoints_still_load(tmp_path):
    from convert.converter import convert_checkpoint

    hf_dir = tmp_path / "hf"
    build_hf_checkpoint("qwen3_5-a", hf_dir)
    add_mtp_weights(hf_dir)
    out = convert_checkpoint(hf_dir, tmp_path / "out", dtype="float32", progress=False)
    manifest = json.loads((out / "qwenvl_jax.json").read_text())
    assert manifest["format_version"] == 3 and manifest["mtp_layers"] == 1
    converted = qj.load(out)
    direct = qj.load(hf_dir, dtype="float32")
    assert converted.config.text.mtp_layers == 1
    np.testing.assert_array_equal(np.asarray(converted.params["mtp"]["fc"]["kernel"]),
                                  np.asarray(direct.params["mtp"]["fc"]["kernel"]))
    # A format-2 directory (no MTP head in the parameter tree; the manifest had "has_mtp") still loads.
    build_hf_checkpoint("qwen3_5-a", tmp_path / "plain_hf")
    old_dir = convert_checkpoint(tmp_path / "plain_hf", tmp_path / "old", dtype="float32", progress=False)
    old_manifest = json.loads((old_dir / "qwenvl_jax.json").read_text())
    del old_manifest["mtp_layers"]
    (old_dir / "qwenvl_jax.json").write_text(json.dumps({**old_manifest, "format_version": 2, "has_mtp": True}))
    old = qj.load(old_dir)
    assert old.config.text.mtp_layers == 0
    ids = [[3, 1, 4, 1, 5]]
    np.testing.assert_allclose(old.logits(ids), converted.logits(ids), rtol=1e-6)


def test_chunked_image_prompt_and_admission_mid_run_stay_exact(tmp_path):
    """An image prompt prefilled in 16-token chunks (vision tokens and MTP positions across chunk boundaries),
    admitted while another request decodes, with MTP drafts: the tokens a plain engine gives."""
    model = mtp_checkpoint("qwen3_5-a", tmp_path)
    requests = [_text_request(np.random.default_rng(8).integers(0, 400, 23), max_new=24), _image_request(model, 16),
                _text_request(np.random.default_rng(9).integers(0, 400, 37), max_new=12)]
    options = dict(prompt_buckets=(16,), max_batch=2)
    plain, _ = _run(_engine(model, speculative_tokens=0, **options), requests)
    drafted, _ = _run(_engine(model, speculative_tokens=3, **options), requests)
    assert drafted == plain and all(len(t) > 6 for t in plain)
