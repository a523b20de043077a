"""Speculative decoding with Qwen3.5's MTP head: the device side (``EngineConfig.speculative_tokens`` = k).

One decode step per row: the target model verifies [next_token, d_1..d_k] in one forward pass (T = k + 1 tokens
over the cache), ``speculative_accept`` keeps the longest accepted prefix plus one token, the caches are rolled
to it (attention: the lengths; Gated DeltaNet: ``commit_verified``), and the MTP head drafts the next k tokens.
All of it runs inside the engine's on-device step loop.

The MTP head at cache index p reads the main model's final hidden state at p and the embedding of the token at
p + 1, and writes its own KV cache at p. So it lags the main model by one token: a prompt chunk fills MTP
positions up to its second-to-last token (its last one waits for the next chunk's first token, or, after the
final chunk, for the sampled token), and a verify step fills the positions of the tokens it accepted.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qwenvl_jax.cache import DecodeState, SpecState
from qwenvl_jax.models.attention import AttnCache
from qwenvl_jax.models.context import ForwardContext
from qwenvl_jax.models.gated_deltanet import GdnPending, commit_verified
from qwenvl_jax.models.model import QwenVLModel
from qwenvl_jax.models.rope import mrope_cos_sin
from qwenvl_jax.sampling import mark_seen, speculative_accept


def text_positions(index_bt: jax.Array, rope_delta_b: jax.Array) -> jax.Array:
    """mRoPE positions [3, B, T] of text tokens at cache indexes ``index_bt``."""
    pos_bt = index_bt + rope_delta_b[:, None]
    return jnp.broadcast_to(pos_bt[None], (3, *pos_bt.shape))


def _table_drafts(table_sl: jax.Array, rows: jax.Array | int, index_bk: jax.Array) -> jax.Array:
    """The caller's predicted tokens at cache indexes ``index_bk`` (-1 past the table or where none)."""
    table_bl = table_sl[:rows] if isinstance(rows, int) else table_sl[rows]
    max_len = table_bl.shape[1]
    found = jnp.take_along_axis(table_bl, jnp.minimum(index_bk, max_len - 1), axis=1)
    return jnp.where(index_bk < max_len, found, -1)


def extend_drafts(model: QwenVLModel, spec: SpecState, rows: jax.Array | int, index_b: jax.Array,
                  m_bd: jax.Array, rope_delta_b: jax.Array, active_b: jax.Array, k: int
                  ) -> tuple[tuple[AttnCache, ...], jax.Array]:
    """k drafts from ``m_bd``, the MTP output at cache index ``index_b`` (its token sits at index + 1): draft i
    (0-based) is for index + 2 + i. Steps past the first feed the previous draft and MTP output back in, at
    index + 1 + i. Returns (MTP caches, drafts [B, k] int32)."""
    lm = model.language_model
    max_len = spec.mtp_layers[0].k.shape[1]
    caches, drafts = spec.mtp_layers, []
    predicted_bk = _table_drafts(spec.draft_table, rows, index_b[:, None] + 2 + jnp.arange(k)[None, :])
    for i in range(k):
        mtp_draft_b = jnp.argmax(model.lm_logits(m_bd).astype(jnp.float32), axis=-1).astype(jnp.int32)
        draft_b = jnp.where(predicted_bk[:, i] >= 0, predicted_bk[:, i], mtp_draft_b)
        drafts.append(draft_b)
        if i + 1 == k:
            break
        index_step_b = index_b + 1 + i
        # Near the end of the cache a step has no room: it writes and reads nothing (its draft is never
        # verified, as the request ends first).
        fits_b = active_b & (index_step_b < max_len)
        index_step_b = jnp.minimum(index_step_b, max_len - 1)
        cos, sin = mrope_cos_sin(text_positions(index_step_b[:, None], rope_delta_b), lm.cfg)
        ctx = ForwardContext(cos, sin, fits_b.astype(jnp.int32), index_step_b, rows, False)
        m_b1d, caches = model.mtp(lm.embed_tokens(draft_b[:, None]), m_bd[:, None], ctx, caches)
        m_bd = m_b1d[:, 0]
    return caches, jnp.stack(drafts, axis=1)


def prefill_mtp(model: QwenVLModel, spec: SpecState, embeds_btd: jax.Array, hidden_btd: jax.Array,
                positions_3bt: jax.Array, prev_position_3b: jax.Array, lengths_b: jax.Array, starts_b: jax.Array,
                slots_b: jax.Array, fresh: bool) -> SpecState:
    """The MTP positions a prompt chunk completes: those before its last token (whose next token is in the
    chunk), and the previous chunk's last token (whose next token is this chunk's first). ``prev_position_3b``:
    the mRoPE position of that previous token (ignored for a first chunk)."""
    b, t, d = hidden_btd.shape
    if fresh:  # positions 0 .. length-2: hidden i with the embedding of token i + 1
        next_embeds = jnp.concatenate([embeds_btd[:, 1:], jnp.zeros((b, 1, d), embeds_btd.dtype)], axis=1)
        hidden_in, positions, starts, lengths = hidden_btd, positions_3bt, starts_b, jnp.maximum(lengths_b - 1, 0)
    else:  # positions start-1 .. start+length-2
        next_embeds = embeds_btd
        hidden_in = jnp.concatenate([spec.chunk_hidden[slots_b][:, None], hidden_btd[:, :-1]], axis=1)
        positions = jnp.concatenate([prev_position_3b[:, :, None], positions_3bt[:, :, :-1]], axis=2)
        starts, lengths = starts_b - 1, lengths_b
    cos, sin = mrope_cos_sin(positions, model.language_model.cfg)
    ctx = ForwardContext(cos, sin, lengths, starts, slots_b, fresh)
    _, caches = model.mtp(next_embeds, hidden_in, ctx, spec.mtp_layers)
    last_bd = hidden_btd[jnp.arange(b), lengths_b - 1]
    return spec._replace(mtp_layers=caches,
                         chunk_hidden=spec.chunk_hidden.at[slots_b].set(last_bd))


def first_drafts(model: QwenVLModel, spec: SpecState, token_b: jax.Array, last_position_3b: jax.Array,
                 index_b: jax.Array, rope_delta_b: jax.Array, slots_b: jax.Array, table_bl: jax.Array) -> SpecState:
    """After a prompt's final chunk: the MTP position of its last token (cache index ``index_b``, mRoPE position
    ``last_position_3b``), whose next token is the sampled first token, then the first k drafts."""
    lm = model.language_model
    spec = spec._replace(draft_table=spec.draft_table.at[slots_b].set(table_bl))
    cos, sin = mrope_cos_sin(last_position_3b[:, :, None], lm.cfg)
    ones_b = jnp.ones_like(index_b)
    ctx = ForwardContext(cos, sin, ones_b, index_b, slots_b, False)
    hidden_bd = spec.chunk_hidden[slots_b]
    m_b1d, caches = model.mtp(lm.embed_tokens(token_b[:, None]), hidden_bd[:, None], ctx, spec.mtp_layers)
    caches, drafts_bk = extend_drafts(model, spec._replace(mtp_layers=caches), slots_b, index_b, m_b1d[:, 0],
                                      rope_delta_b, ones_b.astype(bool), spec.drafts.shape[1])
    return spec._replace(mtp_layers=caches, drafts=spec.drafts.at[slots_b].set(drafts_bk))


def speculative_step(model: QwenVLModel, state: DecodeState, rows: int, active_s: jax.Array, eos_e: jax.Array,
                     keys_s: jax.Array, sampling, max_len: int) -> tuple[DecodeState, jax.Array]:
    """One verify-accept-draft step for slots [0, rows): (state, tokens [rows, T], -1 where not emitted)."""
    lm = model.language_model
    spec = state.spec
    k = spec.drafts.shape[1]
    t = k + 1
    token_s = state.next_token[:rows]
    start_s = state.lengths[:rows]
    rope_delta_s = state.rope_delta[:rows]
    drafts_sk = spec.drafts[:rows]
    # Tokens past the cache are not verified (nothing is written or read beyond it).
    room_s = jnp.clip(max_len - start_s, 0, t)
    verify_len_s = jnp.where(active_s, room_s, 0)
    index_st = start_s[:, None] + jnp.arange(t)[None, :]
    cos, sin = mrope_cos_sin(text_positions(index_st, rope_delta_s), lm.cfg)
    ctx = ForwardContext(cos, sin, verify_len_s, start_s, rows, False, verify=True)
    tokens_st = jnp.concatenate([token_s[:, None], drafts_sk], axis=1)
    hidden_std, layers = lm.forward(lm.embed_tokens(tokens_st), ctx, state.layers)
    logits_stv = model.lm_logits(hidden_std).astype(jnp.float32)
    out_st, accepted_s = speculative_accept(logits_stv, drafts_sk, sampling, keys_s, state.seen)

    # Emitted tokens end at the first stop: end of sequence, max_new_tokens, or the cache's end.
    j_t = jnp.arange(t)[None, :]
    stop_st = (jnp.isin(out_st, eos_e) | (state.remaining[:rows, None] - (j_t + 1) <= 0)
               | (start_s[:, None] + j_t + 2 >= max_len))
    candidate_st = j_t < jnp.minimum(accepted_s, room_s)[:, None]
    first_stop_s = jnp.argmax(stop_st & candidate_st, axis=1)
    stopped_s = jnp.any(stop_st & candidate_st, axis=1)
    emitted_s = jnp.where(stopped_s, first_stop_s + 1, jnp.minimum(accepted_s, room_s))
    emitted_s = jnp.where(active_s, emitted_s, 0)
    emitted_st = j_t < emitted_s[:, None]

    layers = tuple(commit_verified(c, emitted_s) if isinstance(c, GdnPending) else c for c in layers)
    last_s = jnp.take_along_axis(out_st, jnp.maximum(emitted_s - 1, 0)[:, None], axis=1)[:, 0]
    state = state._replace(
        layers=layers,
        lengths=state.lengths.at[:rows].set(start_s + emitted_s),
        remaining=state.remaining.at[:rows].set(state.remaining[:rows] - emitted_s),
        next_token=state.next_token.at[:rows].set(jnp.where(active_s, last_s, token_s)),
        active=state.active.at[:rows].set(active_s & ~stopped_s),
        seen=mark_seen(state.seen, out_st, emitted_st),
    )

    # MTP: the positions of the consumed tokens (hidden at start + j, next token out_j), then k drafts from the
    # last of them.
    mtp_ctx = ForwardContext(cos, sin, emitted_s, start_s, rows, False)
    m_std, caches = model.mtp(lm.embed_tokens(out_st), hidden_std, mtp_ctx, spec.mtp_layers)
    last_index_s = start_s + jnp.maximum(emitted_s - 1, 0)
    m_sd = jnp.take_along_axis(m_std, jnp.maximum(emitted_s - 1, 0)[:, None, None], axis=1)[:, 0]
    caches, new_drafts_sk = extend_drafts(model, spec._replace(mtp_layers=caches), rows, last_index_s, m_sd,
                                          rope_delta_s, state.active[:rows], k)
    spec = spec._replace(mtp_layers=caches, drafts=spec.drafts.at[:rows].set(new_drafts_sk))
    return state._replace(spec=spec), jnp.where(emitted_st, out_st, -1)
