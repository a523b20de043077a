"""Token sampling on the device: repetition penalty, temperature, top-k, top-p, min-p, per-request seeds.

Every function here is jit-friendly (static shapes, no host sync, no Python branching on array values) so the
engine can call :func:`sample` inside its on-device decode loop. Parameters are per row, so one batch mixes
greedy and sampled requests with different settings. The processing order and semantics follow HF
``generate``: ``RepetitionPenaltyLogitsProcessor``, then ``TemperatureLogitsWarper``, ``TopKLogitsWarper``,
``TopPLogitsWarper``, ``MinPLogitsWarper`` (each with ``min_tokens_to_keep=1``).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import secrets
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

_SEED_LIMIT = 2**64
_RADIX_BITS = 4  # bits of the cutoff found per sweep over the vocabulary: 8 sweeps, 15 thresholds each


def _check_seed(seed: object) -> None:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < _SEED_LIMIT:
        raise ValueError(f"seed must be None or an integer in [0, 2**64), got {seed!r}")


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """One request's sampling settings. ``temperature=0`` is greedy decoding; ``top_k=0``, ``top_p=1``,
    ``min_p=0`` and ``repetition_penalty=1`` switch the respective filter off. ``seed=None`` draws a fresh
    random seed when the request's key is made (:func:`request_key`)."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        for name in ("temperature", "top_p", "min_p", "repetition_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite real number, got {value!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 means greedy), got {self.temperature!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, numbers.Integral) or self.top_k < 0:
            raise ValueError(f"top_k must be a non-negative integer (0 means off), got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not 0 <= self.min_p < 1:
            raise ValueError(f"min_p must be in [0, 1), got {self.min_p!r}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0 (1 means off), got {self.repetition_penalty!r}")
        if self.seed is not None:
            _check_seed(self.seed)


class SamplingArrays(NamedTuple):
    """Per-row sampling parameters of a batch, each of shape ``[S]`` (a pytree; pass it into jitted code)."""

    temperature: jax.Array | np.ndarray  # f32, 0 = greedy
    top_k: jax.Array | np.ndarray  # i32, 0 = off
    top_p: jax.Array | np.ndarray  # f32, 1 = off
    min_p: jax.Array | np.ndarray  # f32, 0 = off
    repetition_penalty: jax.Array | np.ndarray  # f32, 1 = off


def sampling_arrays(params: Sequence[SamplingParams], batch_size: int | None = None) -> SamplingArrays:
    """Host-side (numpy) per-row arrays for ``params``; rows past ``len(params)`` up to ``batch_size`` (padding
    rows of a batch bucket) are greedy with every filter off."""
    batch_size = len(params) if batch_size is None else batch_size
    if batch_size < len(params):
        raise ValueError(f"batch_size {batch_size} is smaller than the {len(params)} requests given")
    rows = list(params) + [SamplingParams()] * (batch_size - len(params))
    return SamplingArrays(
        temperature=np.array([p.temperature for p in rows], np.float32),
        top_k=np.array([p.top_k for p in rows], np.int32),
        top_p=np.array([p.top_p for p in rows], np.float32),
        min_p=np.array([p.min_p for p in rows], np.float32),
        repetition_penalty=np.array([p.repetition_penalty for p in rows], np.float32),
    )


@jax.jit
def _keys_from_seed_words(low_s: jax.Array, high_s: jax.Array) -> jax.Array:
    # Seeds are split into 32-bit words because jax.random.key truncates Python ints to 32 bits without x64.
    return jax.vmap(lambda low, high: jax.random.fold_in(jax.random.key(low), high))(low_s, high_s)


def request_keys(seeds: Sequence[int | None]) -> jax.Array:
    """Typed PRNG keys ``[S]``, one per request; a ``None`` seed gets a fresh random seed from the host. The
    engine derives step keys as ``vmap(jax.random.fold_in)(keys, step)``."""
    seeds = [secrets.randbits(64) if seed is None else seed for seed in seeds]
    for seed in seeds:
        _check_seed(seed)
    low = np.array([seed & 0xFFFFFFFF for seed in seeds], np.uint32)
    high = np.array([seed >> 32 for seed in seeds], np.uint32)
    return _keys_from_seed_words(low, high)


def request_key(seed: int | None) -> jax.Array:
    """The typed PRNG key of one request (see :func:`request_keys`)."""
    return request_keys([seed])[0]


def mark_seen(seen_sv: jax.Array, token_ids_sn: jax.Array, valid_sn: jax.Array | None = None) -> jax.Array:
    """Sets ``seen_sv[s, token_ids_sn[s, n]]`` for every valid ``(s, n)``: the token-presence mask that the
    repetition penalty reads (fill it with the prompt, then with each sampled token)."""
    vocab_size = seen_sv.shape[1]
    if valid_sn is not None:
        # Out-of-range ids are dropped by the scatter, so invalid entries (padding) touch nothing.
        token_ids_sn = jnp.where(valid_sn, token_ids_sn, vocab_size)
    # Row s of the ids marks row s of the mask: a slot pool with more rows is updated in place, rows past the ids
    # untouched, and the scatter writes only the marked elements.
    rows_sn = jnp.broadcast_to(jnp.arange(token_ids_sn.shape[0])[:, None], token_ids_sn.shape)
    return seen_sv.at[rows_sn, token_ids_sn].set(True, mode="drop")


def _apply_repetition_penalty(logits_sv: jax.Array, penalty_s: jax.Array, seen_sv: jax.Array | None) -> jax.Array:
    """``seen_sv`` may be a slot pool with more rows than the logits (rows [0, S) are used). The [S, V] mask is
    read only when some row has a penalty: a batch without one never touches it."""
    if seen_sv is None:
        return logits_sv

    def penalise() -> jax.Array:
        penalty_s1 = penalty_s[:, None]
        penalised_sv = jnp.where(logits_sv < 0, logits_sv * penalty_s1, logits_sv / penalty_s1)
        return jnp.where(seen_sv[: logits_sv.shape[0]], penalised_sv, logits_sv)

    return jax.lax.cond(jnp.any(penalty_s != 1), penalise, lambda: logits_sv)


def _order_keys(x_sv: jax.Array) -> jax.Array:
    """uint32 keys ordered as the float32 values are (IEEE-754 sign-magnitude made monotone); -0.0 and +0.0
    share a key, as they compare equal."""
    bits_sv = jax.lax.bitcast_convert_type(jnp.where(x_sv == 0, 0.0, x_sv), jnp.uint32)
    return jnp.where(bits_sv >> 31 == 1, ~bits_sv, bits_sv | jnp.uint32(0x80000000))


def _keep_all_key(keys_sv: jax.Array, *_: jax.Array) -> jax.Array:
    return jnp.zeros(keys_sv.shape[:1], jnp.uint32)


def _largest_key_reaching(keys_sv: jax.Array, weights_sv: jax.Array, target_s: jax.Array) -> jax.Array:
    """Per row, the largest key ``t`` with ``sum(weights where keys >= t) >= target`` (radix select).

    A sort of [S, V] rows is slow on GPUs for S > 1 (XLA sorts the rows one after another: ~70 us per
    248k-token row on an H100), so the cutoff is found bit group by bit group from the top instead: each pass
    tests 2**_RADIX_BITS - 1 thresholds in one sweep over the row. Exact for any weights; a row whose total
    weight is below its target gets key 0 (everything kept)."""
    num_rows = keys_sv.shape[0]
    digits_d = jnp.arange(1, 2**_RADIX_BITS, dtype=jnp.uint32)
    prefix_s = jnp.zeros((num_rows,), jnp.uint32)
    for shift in range(32 - _RADIX_BITS, -1, -_RADIX_BITS):
        thresholds_sd = prefix_s[:, None] | (digits_d[None, :] << shift)
        reached_sd = jnp.sum(jnp.where(keys_sv[:, :, None] >= thresholds_sd[:, None, :], weights_sv[:, :, None], 0),
                             axis=1) >= target_s[:, None]
        # Digit 0 (the prefix itself) always reaches the target; take the largest digit that does.
        digit_s = jnp.max(jnp.where(reached_sd, digits_d[None, :], 0), axis=1)
        prefix_s = prefix_s | (digit_s << shift)
    return prefix_s


def _top_p_key(keys_sv: jax.Array, scaled_sv: jax.Array, top_k_key_s: jax.Array, top_p_s: jax.Array) -> jax.Array:
    """HF sorts ascending and drops tokens whose running probability sum is <= 1 - top_p, i.e. it keeps a token
    iff the mass strictly above it is < top_p: every value >= the largest value v with mass(x >= v) >= top_p
    (which keeps the top token: min_tokens_to_keep=1). The mass is over the top-k-filtered row."""
    top_k_kept_sv = keys_sv >= top_k_key_s[:, None]
    weights_sv = jnp.where(top_k_kept_sv, jnp.exp(scaled_sv - jnp.max(scaled_sv, axis=-1, keepdims=True)), 0.0)
    top_p_key_s = _largest_key_reaching(keys_sv, weights_sv, top_p_s * jnp.sum(weights_sv, axis=-1))
    return jnp.where(top_p_s < 1, top_p_key_s, 0)


def _top_k_top_p_cutoff(scaled_sv: jax.Array, top_k_s: jax.Array, top_p_s: jax.Array) -> jax.Array:
    """Per-row key (see :func:`_order_keys`) below which top-k and top-p filter; each search runs only when
    some row of the batch needs it."""
    vocab_size = scaled_sv.shape[-1]
    keys_sv = _order_keys(scaled_sv)
    # Top-k: the k-th largest value; HF keeps every token tied with it.
    k_s = jnp.where(top_k_s > 0, jnp.minimum(top_k_s, vocab_size), vocab_size)
    top_k_key_s = jax.lax.cond(jnp.any(k_s < vocab_size), _largest_key_reaching, _keep_all_key,
                               keys_sv, jnp.ones(keys_sv.shape, jnp.int32), k_s)
    top_p_key_s = jax.lax.cond(jnp.any(top_p_s < 1), _top_p_key, _keep_all_key,
                               keys_sv, scaled_sv, top_k_key_s, top_p_s)
    return jnp.maximum(top_k_key_s, top_p_key_s)


def _warp(penalised_sv: jax.Array, params: SamplingArrays) -> jax.Array:
    """Temperature, top-k, top-p and min-p of the sampled rows; greedy rows come back unfiltered (scaled by 1)."""
    sampled_s = params.temperature > 0
    temperature_s = jnp.where(sampled_s, params.temperature, 1.0)
    scaled_sv = penalised_sv / temperature_s[:, None]
    top_k_s = jnp.where(sampled_s, params.top_k, 0)
    top_p_s = jnp.where(sampled_s, params.top_p, 1.0)
    cutoff_key_s = _top_k_top_p_cutoff(scaled_sv, top_k_s, top_p_s)
    filtered_sv = jnp.where(_order_keys(scaled_sv) >= cutoff_key_s[:, None], scaled_sv, -jnp.inf)
    # Min-p keeps p >= min_p * p_max, i.e. exp(logit - max_logit) >= min_p: no sort needed. The top token always
    # passes (min_p < 1), which is min_tokens_to_keep=1.
    min_p_s = jnp.where(sampled_s, params.min_p, 0.0)
    max_s = jnp.max(filtered_sv, axis=-1, keepdims=True)
    below_min_p_sv = jnp.exp(filtered_sv - max_s) < min_p_s[:, None]
    return jnp.where(below_min_p_sv, -jnp.inf, filtered_sv)


def process_logits(logits_sv: jax.Array, params: SamplingArrays, seen_sv: jax.Array | None = None) -> jax.Array:
    """The logits :func:`sample` draws from, ``-inf`` where filtered: ``softmax`` of a row is the exact
    distribution of its sampled token. Greedy rows keep only their argmax."""
    logits_sv = logits_sv.astype(jnp.float32)
    penalised_sv = _apply_repetition_penalty(logits_sv, params.repetition_penalty, seen_sv)
    argmax_s = jnp.argmax(penalised_sv, axis=-1)
    only_argmax_sv = jnp.where(jnp.arange(logits_sv.shape[-1]) == argmax_s[:, None], penalised_sv, -jnp.inf)
    greedy_s1 = (params.temperature == 0)[:, None]
    return jnp.where(greedy_s1, only_argmax_sv, _warp(penalised_sv, params))


def sample(logits_sv: jax.Array, params: SamplingArrays, keys_s: jax.Array,
           seen_sv: jax.Array | None = None) -> jax.Array:
    """Next token ``[S] int32`` of each row. Greedy rows (temperature 0) return exactly the argmax of the
    penalised logits; the others draw from :func:`process_logits` with their own key. ``seen_sv`` (bool
    ``[S', V]`` with S' >= S, see :func:`mark_seen`) is needed only for the repetition penalty."""
    logits_sv = logits_sv.astype(jnp.float32)
    penalised_sv = _apply_repetition_penalty(logits_sv, params.repetition_penalty, seen_sv)
    argmax_s = jnp.argmax(penalised_sv, axis=-1).astype(jnp.int32)
    greedy_s = params.temperature == 0

    def draw() -> jax.Array:
        warped_sv = _warp(penalised_sv, params)
        drawn_s = jax.vmap(jax.random.categorical)(keys_s, warped_sv).astype(jnp.int32)
        return jnp.where(greedy_s, argmax_s, drawn_s)

    # An all-greedy batch (the common case) skips the warpers and the Gumbel draw.
    return jax.lax.cond(jnp.all(greedy_s), lambda: argmax_s, draw)


def speculative_accept(logits_rtv: jax.Array, drafts_rk: jax.Array, params: SamplingArrays, keys_r: jax.Array,
                       seen_sv: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Speculative sampling of T = k + 1 verified positions per row against k deterministic drafts.

    ``logits_rtv[:, j]`` is the target's prediction after the row's last token and drafts 1..j. Draft j+1 is
    accepted with probability p_j(draft) (p_j: what :func:`sample` draws from); at the first rejection the token
    is drawn from p_j without the draft, renormalised; if all k are accepted a bonus token is drawn from p_k. The
    emitted tokens then follow the target distribution exactly (Leviathan et al. 2023, with a point-mass draft
    distribution), and greedy rows (p one-hot at the argmax) emit the target's argmax chain. Position j's
    repetition penalty counts drafts 1..j as seen: it is used only when they were all accepted.

    Returns (tokens [R, T]: the drafts while accepted, then the drawn token; entries past it are meaningless,
    and emitted [R] in 1..T: how many tokens of the row are emitted)."""
    rows, t, vocab = logits_rtv.shape
    k = t - 1
    params_flat = SamplingArrays(*(jnp.repeat(jnp.asarray(x), t) for x in params))
    logits_flat = logits_rtv.reshape(rows * t, vocab).astype(jnp.float32)

    def seen_by_position() -> jax.Array:
        seen_rtv = jnp.broadcast_to(seen_sv[:rows, None], (rows, t, vocab))
        earlier_rtk = jnp.arange(k)[None, None, :] < jnp.arange(t)[None, :, None]
        drafts_rtk = jnp.where(earlier_rtk, drafts_rk[:, None, :], vocab)  # vocab: out of range, dropped
        return mark_seen(seen_rtv.reshape(rows * t, vocab), drafts_rtk.reshape(rows * t, k))

    penalised_flat = logits_flat
    if seen_sv is not None:
        penalised_flat = jax.lax.cond(
            jnp.any(params.repetition_penalty != 1),
            lambda: _apply_repetition_penalty(logits_flat, params_flat.repetition_penalty, seen_by_position()),
            lambda: logits_flat)

    def accept(target_rt: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Drafts equal to the target's token are accepted up to the first that is not."""
        accepted_rk = jnp.cumprod(drafts_rk == target_rt[:, :k], axis=1)
        return target_rt, 1 + jnp.sum(accepted_rk, axis=1).astype(jnp.int32)

    def greedy() -> tuple[jax.Array, jax.Array]:
        return accept(jnp.argmax(penalised_flat, axis=-1).astype(jnp.int32).reshape(rows, t))

    def sampled() -> tuple[jax.Array, jax.Array]:
        # The penalty is in already: process_logits without the mask applies none.
        logp_rtv = jax.nn.log_softmax(process_logits(penalised_flat, params_flat).reshape(rows, t, vocab), axis=-1)
        accept_key_r, draw_key_r = jax.vmap(lambda key: tuple(jax.random.split(key)))(keys_r)
        u_rk = jax.vmap(lambda key: jax.random.uniform(key, (k,)))(accept_key_r)
        p_draft_rk = jnp.exp(jnp.take_along_axis(logp_rtv[:, :k], drafts_rk[:, :, None], axis=-1)[..., 0])
        kept_rk = jnp.cumprod(u_rk < p_draft_rk, axis=1).astype(bool)
        emitted_r = 1 + jnp.sum(kept_rk, axis=1).astype(jnp.int32)
        # Position j's draw excludes its draft (the residual distribution); position k has no draft. A rejected
        # draft had p < 1, so its residual has mass; an accepted one's is never read (kept finite regardless).
        drafts_rt = jnp.pad(drafts_rk, ((0, 0), (0, 1)), constant_values=-1)
        residual_rtv = jnp.where(jnp.arange(vocab)[None, None, :] == drafts_rt[:, :, None], -jnp.inf, logp_rtv)
        residual_rtv = jnp.where(jnp.all(residual_rtv == -jnp.inf, axis=-1, keepdims=True), logp_rtv, residual_rtv)
        drawn_rt = jax.vmap(lambda key, lp: jax.random.categorical(key, lp, axis=-1))(draw_key_r, residual_rtv)
        tokens_rt = jnp.where(jnp.arange(t)[None, :] < emitted_r[:, None] - 1, drafts_rt, drawn_rt)
        return tokens_rt.astype(jnp.int32), emitted_r

    # An all-greedy batch (the common case) skips the warpers and the draws.
    return jax.lax.cond(jnp.all(params.temperature == 0), greedy, sampled)
