"""qwenvl_jax.sampling against HF's logits processors/warpers, plus determinism, frequencies and validation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from qwenvl_jax.sampling import (
    SamplingParams,
    mark_seen,
    process_logits,
    request_key,
    request_keys,
    sample,
    sampling_arrays,
)

VOCAB = 1000
process_logits_jit = jax.jit(process_logits)
sample_jit = jax.jit(sample)


def hf_process(logits_v: np.ndarray, params: SamplingParams, seen_ids: list[int]) -> np.ndarray:
    """The scores HF generate(do_sample=True) draws from, built with the same conditions HF uses to add each
    processor (generation/utils.py: _get_logits_processor)."""
    scores = torch.from_numpy(logits_v[None].copy())
    input_ids = torch.tensor([seen_ids], dtype=torch.long)
    processors = []
    if params.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(float(params.repetition_penalty)))
    if params.temperature != 1.0:
        processors.append(TemperatureLogitsWarper(float(params.temperature)))
    if params.top_k != 0:
        processors.append(TopKLogitsWarper(params.top_k))
    if params.top_p < 1.0:
        processors.append(TopPLogitsWarper(params.top_p))
    if params.min_p:
        processors.append(MinPLogitsWarper(params.min_p))
    for processor in processors:
        scores = processor(input_ids, scores)
    return scores[0].numpy()


def random_case(seed: int, rows: int, vocab: int = VOCAB) -> tuple[np.ndarray, list[list[int]]]:
    rng = np.random.default_rng(seed)
    logits_sv = (rng.standard_normal((rows, vocab)) * rng.uniform(0.5, 4.0, (rows, 1))).astype(np.float32)
    seen_ids = [rng.choice(vocab, size=int(rng.integers(1, 40)), replace=True).tolist() for _ in range(rows)]
    return logits_sv, seen_ids


def seen_mask(seen_ids: list[list[int]], vocab: int) -> jax.Array:
    width = max(len(ids) for ids in seen_ids)
    ids_sn = np.zeros((len(seen_ids), width), np.int32)
    valid_sn = np.zeros((len(seen_ids), width), bool)
    for row, ids in enumerate(seen_ids):
        ids_sn[row, :len(ids)] = ids
        valid_sn[row, :len(ids)] = True
    return mark_seen(jnp.zeros((len(seen_ids), vocab), bool), jnp.asarray(ids_sn), jnp.asarray(valid_sn))


def assert_same_processed(ours_v: np.ndarray, hf_v: np.ndarray) -> None:
    np.testing.assert_array_equal(np.isfinite(ours_v), np.isfinite(hf_v))
    kept = np.isfinite(hf_v)
    np.testing.assert_allclose(ours_v[kept], hf_v[kept], rtol=1e-6, atol=1e-6)


HF_CASES = [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.3),
    SamplingParams(temperature=2.5),
    SamplingParams(temperature=1.0, top_k=1),
    SamplingParams(temperature=0.8, top_k=7),
    SamplingParams(temperature=1.0, top_k=VOCAB + 50),
    SamplingParams(temperature=1.0, top_p=0.05),
    SamplingParams(temperature=0.7, top_p=0.5),
    SamplingParams(temperature=1.3, top_p=0.95),
    SamplingParams(temperature=1.0, min_p=0.05),
    SamplingParams(temperature=0.5, min_p=0.3),
    SamplingParams(temperature=1.0, repetition_penalty=1.3),
    SamplingParams(temperature=1.0, repetition_penalty=0.6),
    SamplingParams(temperature=0.7, top_k=50, top_p=0.9),
    SamplingParams(temperature=0.9, top_k=20, top_p=0.8, min_p=0.1, repetition_penalty=1.2),
    SamplingParams(temperature=1.4, top_p=0.7, min_p=0.02, repetition_penalty=1.5),
    SamplingParams(temperature=0.6, top_k=200, min_p=0.05),
]


@pytest.mark.parametrize("case", range(len(HF_CASES)))
def test_processed_logits_equal_hf(case):
    params = HF_CASES[case]
    logits_sv, seen_ids = random_case(seed=100 + case, rows=4)
    ours_sv = np.asarray(process_logits_jit(jnp.asarray(logits_sv), sampling_arrays([params] * 4),
                                            seen_mask(seen_ids, VOCAB)))
    for row in range(4):
        assert_same_processed(ours_sv[row], hf_process(logits_sv[row], params, seen_ids[row]))


def test_ties_at_the_top_k_and_min_p_thresholds_match_hf():
    # Logits on a coarse grid make many exact ties; HF keeps every token tied with the k-th value.
    rng = np.random.default_rng(7)
    logits_sv = np.round(rng.standard_normal((3, 200)) * 2).astype(np.float32)
    for params in (SamplingParams(temperature=1.0, top_k=10), SamplingParams(temperature=1.0, min_p=0.1),
                   SamplingParams(temperature=0.5, top_k=30, min_p=0.2)):
        ours_sv = np.asarray(process_logits_jit(jnp.asarray(logits_sv), sampling_arrays([params] * 3)))
        for row in range(3):
            assert_same_processed(ours_sv[row], hf_process(logits_sv[row], params, []))
    # -0.0 and +0.0 are one value to HF's comparisons.
    signed_zeros_sv = np.array([[-0.0, 0.0, -1.0, 1.0, -2.0]], np.float32)
    params = SamplingParams(temperature=1.0, top_k=2)
    ours_v = np.asarray(process_logits_jit(jnp.asarray(signed_zeros_sv), sampling_arrays([params])))[0]
    assert_same_processed(ours_v, hf_process(signed_zeros_sv[0], params, []))
    assert np.isfinite(ours_v).sum() == 3


def test_mixed_batch_rows_equal_each_row_alone():
    params = [HF_CASES[1], SamplingParams(), HF_CASES[4], HF_CASES[7], HF_CASES[10], HF_CASES[14],
              SamplingParams(repetition_penalty=1.5), HF_CASES[12]]
    logits_sv, seen_ids = random_case(seed=3, rows=len(params))
    seen_sv = seen_mask(seen_ids, VOCAB)
    keys_s = request_keys(range(len(params)))
    batch_arrays = sampling_arrays(params)
    batch_processed = np.asarray(process_logits_jit(jnp.asarray(logits_sv), batch_arrays, seen_sv))
    batch_tokens = np.asarray(sample_jit(jnp.asarray(logits_sv), batch_arrays, keys_s, seen_sv))
    for row, row_params in enumerate(params):
        alone = sampling_arrays([row_params])
        row_logits = jnp.asarray(logits_sv[row:row + 1])
        alone_processed = np.asarray(process_logits_jit(row_logits, alone, seen_sv[row:row + 1]))
        np.testing.assert_array_equal(batch_processed[row], alone_processed[0])
        alone_token = sample_jit(row_logits, alone, keys_s[row:row + 1], seen_sv[row:row + 1])
        assert batch_tokens[row] == int(alone_token[0])
        if row_params.temperature > 0:  # the HF check that each row kept its own parameters
            assert_same_processed(batch_processed[row], hf_process(logits_sv[row], row_params, seen_ids[row]))


def test_greedy_rows_return_exact_argmax_of_penalised_logits():
    logits_sv, seen_ids = random_case(seed=11, rows=6)
    logits_sv[0, :5] = logits_sv[0].max() + 1.0  # ties: the first index wins, as in torch.argmax
    params = [SamplingParams(), SamplingParams(repetition_penalty=2.0), SamplingParams(repetition_penalty=0.5),
              SamplingParams(temperature=1.0), SamplingParams(top_k=3, top_p=0.1), SamplingParams(min_p=0.5)]
    seen_sv = seen_mask(seen_ids, VOCAB)
    tokens = np.asarray(sample_jit(jnp.asarray(logits_sv), sampling_arrays(params), request_keys([0] * 6), seen_sv))
    for row in (0, 1, 2, 4, 5):
        penalised = hf_process(logits_sv[row], SamplingParams(repetition_penalty=params[row].repetition_penalty,
                                                              temperature=1.0), seen_ids[row])
        assert tokens[row] == int(torch.from_numpy(penalised).argmax())
    assert tokens[0] == 0
    # An all-greedy batch takes the branch that skips the warpers; same answers.
    greedy_rows = [0, 1, 2, 4, 5]
    all_greedy = sample_jit(jnp.asarray(logits_sv[greedy_rows]), sampling_arrays([params[r] for r in greedy_rows]),
                            request_keys([0] * 5), seen_sv[jnp.asarray(greedy_rows)])
    np.testing.assert_array_equal(np.asarray(all_greedy), tokens[greedy_rows])


def test_same_seed_same_tokens_different_seeds_differ():
    logits_sv = np.zeros((4, VOCAB), np.float32)  # uniform: every draw is pure key randomness
    arrays = sampling_arrays([SamplingParams(temperature=1.0)] * 4)

    @jax.jit
    def sixteen_steps(keys_s):
        def step(i, tokens_ts):
            step_keys_s = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys_s, i)
            return tokens_ts.at[i].set(sample(jnp.asarray(logits_sv), arrays, step_keys_s))
        return jax.lax.fori_loop(0, 16, step, jnp.zeros((16, 4), jnp.int32))

    first = np.asarray(sixteen_steps(request_keys([1, 1, 2, 2**32 + 1])))
    again = np.asarray(sixteen_steps(request_keys([1, 1, 2, 2**32 + 1])))
    np.testing.assert_array_equal(first, again)
    np.testing.assert_array_equal(first[:, 0], first[:, 1])
    assert not np.array_equal(first[:, 0], first[:, 2])
    assert not np.array_equal(first[:, 0], first[:, 3])  # seeds equal mod 2**32 are still different seeds
    assert len(np.unique(first[:, 0])) > 10  # steps draw fresh tokens
    unseeded = np.asarray(sixteen_steps(request_keys([None] * 4)))
    assert not np.array_equal(unseeded[:, 0], unseeded[:, 1])


def test_sampled_frequencies_follow_the_processed_softmax():
    draws, vocab = 40_000, 24
    rng = np.random.default_rng(5)
    logits_v = (rng.standard_normal(vocab) * 1.5).astype(np.float32)
    for params in (SamplingParams(temperature=0.8), SamplingParams(temperature=1.2, top_k=12, top_p=0.9, min_p=0.03)):
        arrays = sampling_arrays([params] * draws)
        logits_sv = jnp.broadcast_to(jnp.asarray(logits_v), (draws, vocab))
        keys_s = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(request_key(1234), jnp.arange(draws))
        tokens = np.asarray(sample_jit(logits_sv, arrays, keys_s))
        expected = np.asarray(jax.nn.softmax(process_logits_jit(logits_sv[:1], sampling_arrays([params]))[0]))
        counts = np.bincount(tokens, minlength=vocab)
        assert counts[expected == 0].sum() == 0  # filtered tokens are never drawn
        kept = expected > 0
        chi_square = ((counts[kept] - draws * expected[kept]) ** 2 / (draws * expected[kept])).sum()
        # 99.9th percentile of chi-square with kept-1 <= 23 degrees of freedom is below 50.
        assert chi_square < 50, (chi_square, counts, expected * draws)


def test_mark_seen_ignores_invalid_entries():
    seen_sv = mark_seen(jnp.zeros((2, 8), bool), jnp.array([[1, 3, 5], [2, 2, 7]]),
                        jnp.array([[True, False, True], [True, True, False]]))
    expected = np.zeros((2, 8), bool)
    expected[0, [1, 5]] = True
    expected[1, 2] = True
    np.testing.assert_array_equal(np.asarray(seen_sv), expected)


def test_sampling_arrays_pad_rows_to_a_greedy_default():
    arrays = sampling_arrays([SamplingParams(temperature=0.5, top_k=3, top_p=0.9, min_p=0.1,
                                             repetition_penalty=1.1)], batch_size=3)
    np.testing.assert_allclose(arrays.temperature, [0.5, 0, 0])
    np.testing.assert_array_equal(arrays.top_k, [3, 0, 0])
    np.testing.assert_allclose(arrays.top_p, [0.9, 1, 1])
    np.testing.assert_allclose(arrays.min_p, [0.1, 0, 0])
    np.testing.assert_allclose(arrays.repetition_penalty, [1.1, 1, 1])
    assert arrays.top_k.dtype == np.int32 and arrays.temperature.dtype == np.float32
    with pytest.raises(ValueError, match="batch_size 1 is smaller than the 2 requests"):
        sampling_arrays([SamplingParams()] * 2, batch_size=1)


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=-0.1), r"temperature must be >= 0 .*got -0\.1"),
    (dict(temperature=float("nan")), r"temperature must be a finite real number, got nan"),
    (dict(temperature=float("inf")), r"temperature must be a finite real number, got inf"),
    (dict(temperature="1"), r"temperature must be a finite real number, got '1'"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\], got 0\.0"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\], got 1\.5"),
    (dict(top_p=float("nan")), r"top_p must be a finite real number, got nan"),
    (dict(top_k=-1), r"top_k must be a non-negative integer .*got -1"),
    (dict(top_k=2.5), r"top_k must be a non-negative integer .*got 2\.5"),
    (dict(top_k=True), r"top_k must be a non-negative integer .*got True"),
    (dict(min_p=1.0), r"min_p must be in \[0, 1\), got 1\.0"),
    (dict(min_p=-0.2), r"min_p must be in \[0, 1\), got -0\.2"),
    (dict(repetition_penalty=0.0), r"repetition_penalty must be > 0 .*got 0\.0"),
    (dict(repetition_penalty=float("-inf")), r"repetition_penalty must be a finite real number, got -inf"),
    (dict(seed=1.0), r"seed must be None or an integer in \[0, 2\*\*64\), got 1\.0"),
    (dict(seed=-3), r"seed must be None or an integer .*got -3"),
    (dict(seed="7"), r"seed must be None or an integer .*got '7'"),
])
def test_invalid_parameters_name_the_parameter_and_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_valid_parameters_are_accepted():
    SamplingParams(temperature=0, top_k=np.int64(5), top_p=1, min_p=0.0, repetition_penalty=0.1, seed=2**64 - 1)
    with pytest.raises(ValueError, match=r"seed must be None or an integer .*got 18446744073709551616"):
        request_keys([2**64])
