"""Compiled prefill/decode programs over device-resident, donated decode state, and the host loop that drives them.

A fixed set of programs (prefill per prompt-length bucket, decode per batch bucket) is compiled once at warm-up and
then replayed: XLA's executables are our CUDA-graph capture/replay. The decode state (``qwenvl_jax.cache``) is
donated into every call and updated in place; a decode call runs K steps with sampling and stop checks on the
device, and the host dispatches the next call before it reads the previous call's tokens.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import time
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwenvl_jax.cache import DecodeState, SpecState, tree_bytes
from qwenvl_jax.device_memory import explain_out_of_memory
from qwenvl_jax.models.attention import AttnCache
from qwenvl_jax.models.context import ForwardContext
from qwenvl_jax.models.decoder import init_layer_caches
from qwenvl_jax.models.model import QwenVLModel
from qwenvl_jax.models.mtp import init_mtp_caches
from qwenvl_jax.models.multimodal import fuse_vision
from qwenvl_jax.models.vision import prepare_vision_inputs
from qwenvl_jax.models.rope import mrope_cos_sin
from qwenvl_jax.prefix_cache import (DEFAULT_PAGE_TOKENS, Hit, PrefixCache, common_prefix, request_content,
                                     vision_spans)
from qwenvl_jax.sampling import SamplingArrays, SamplingParams, mark_seen, request_keys, sample, sampling_arrays
from qwenvl_jax.sharding import mesh_context, mesh_of, replicated, shard_state
from qwenvl_jax.speculative import first_drafts, prefill_mtp, speculative_step


DEFAULT_MAX_LEN = 4096  # the library's and the CLI's context per request
DEFAULT_PROMPT_BUCKETS = (64, 256, 1024)
# Rows of a batched prefill call: powers of four keep the compiled programs few (each row count is a program
# per bucket) while a group of n prompts still needs at most 3 calls per power.
PREFILL_ROWS = (1, 4, 16, 64)
MAX_SPECULATIVE_TOKENS = 4
# The default k where a model has an MTP head, dense / MoE. Measured (bench/NOTES.md), dense Qwen3.5-9B on an
# H200: a k = 2 step costs 1.19x a plain one at batch 1 and 1.38x at batch 8, so at a draft acceptance of 0.6
# (1.96 tokens a step) it decodes 1.65x / 1.41x faster. Qwen3.5-35B-A3B on an H100: each verified token routes
# to its own experts, so a step's expert bytes grow with k + 1 and k = 2 at batch 8 (2.01x a plain step) was
# 0.97x plain at 0.6; k = 1 (1.25x / 1.56x a step) was 1.28x / 1.02x. Batches past 8 are not measured, so they
# do not speculate by default.
DEFAULT_SPECULATIVE_TOKENS = 2
DEFAULT_SPECULATIVE_TOKENS_MOE = 1
SPECULATIVE_MAX_BATCH = 8
# Streamed decode calls: how many recent calls' step times the next call's size takes the least of (~0.3 s of
# 40 ms calls: a context that grows moves the least up within that).
STEP_TIME_WINDOW = 8
# The vision tower compiled with XLA's Triton GEMM fusions off: its autotuner fused the RMSNorm into Qwen2.5-VL's
# 3420-wide MLP GEMMs as Triton kernels at 30-41% of the matmul rate, where cuBLAS runs them unfused. Measured
# (H100, bench/vision_tower.py --compare-options, 0f86643): Qwen2.5-VL-7B 4K / 16K patches 23.6 -> 19.3 /
# 96.8 -> 78.4 ms, Qwen3-VL-8B 21.9 -> 20.4 / 152.1 -> 148.2 ms. Other backends ignore the option.
VISION_COMPILER_OPTIONS = {"xla_gpu_enable_triton_gemm": False}


def vision_bucket(patches: int, buckets: Sequence[int]) -> int:
    """The patches a request's vision call is padded to: the least configured bucket that holds them, else the
    least 2^k or 3 * 2^(k - 2) that does. Padding patches cost the tower's GEMMs as real ones do: a
    1024 x 1024 image is 5476 Qwen2.5-VL patches, which the next power of two pads by half (8192), 3 * 2^11 by
    an eighth (6144); the compiled programs stay one per bucket, two a doubling."""
    fits = [b for b in buckets if b >= patches]
    if fits:
        return min(fits)
    power = 1 << (patches - 1).bit_length()
    return 3 * power // 4 if power >= 16 and 3 * power // 4 >= patches else power


def _squarest_frame(patches: int, merge: int) -> tuple[int, int]:
    """(h, w): the most nearly square frame of this many patches with both sides multiples of ``merge``
    (``patches`` a multiple of merge^2)."""
    h = max(merge, math.isqrt(patches) // merge * merge)
    while h > merge and (patches % h or patches // h % merge):
        h -= merge
    return h, patches // h


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    max_batch: int = 1  # concurrent requests (decode slots)
    max_len: int = DEFAULT_MAX_LEN  # prompt + generated tokens per request
    # Prefill lengths; longer prompts are prefilled in chunks. None: the DEFAULT_PROMPT_BUCKETS that fit max_len
    # (max_len itself if none does), filled in at construction.
    prompt_buckets: tuple[int, ...] | None = None
    decode_steps: int = 16  # tokens per decode call
    # While streaming, a token reaches the caller when its decode call ends: calls are sized (1..decode_steps
    # tokens, from the step time the previous calls measured) to end about this often. One compiled program runs
    # any count: the count is data.
    stream_interval_ms: float = 40.0
    batch_buckets: tuple[int, ...] = ()  # decode batch sizes; default: powers of two up to max_batch
    # Vision patches per request (multiples of 4, the 2 x 2 merge); beyond the largest, see vision_bucket.
    vision_buckets: tuple[int, ...] = (256, 1024, 4096)
    vision_table_rows: int = 128  # 2D rotary table rows: grids up to this many patches a side share one program
    chunked_prefill: bool = True  # prompts longer than the largest bucket: prefill in chunks (else an error)
    # Text prompts admitted together that fit one bucket share prefill calls of PREFILL_ROWS rows, up to this many
    # tokens (rows x bucket) per call: a short prompt alone leaves the GPU's matrix units idle.
    prefill_tokens: int = 8192
    # Draft tokens per decode step from Qwen3.5's MTP head (0: no speculation). Each step verifies them in one
    # target pass and emits the accepted ones plus one: exact (greedy output is unchanged, sampling keeps the
    # target distribution), faster when most drafts are accepted. None: DEFAULT_SPECULATIVE_TOKENS (MoE models:
    # DEFAULT_SPECULATIVE_TOKENS_MOE) when the model carries an MTP head and max_batch is at most
    # SPECULATIVE_MAX_BATCH, else 0.
    speculative_tokens: int | None = None
    # Prefix caching (``qwenvl_jax.prefix_cache``): a request reuses the state an earlier request left after their
    # longest shared prefix (text, and images by their pixels) and prefills only the rest. The pool holds
    # prefix_cache_bytes (None: the smaller of 2 GiB and 8 whole contexts per slot) of attention pages of
    # prefix_page_tokens positions and, for hybrid models, Gated DeltaNet state snapshots, evicted least recently
    # used. A hybrid model's prompt is prefilled in chunks of prefix_snapshot_interval tokens (a prompt bucket;
    # None: the largest) with a snapshot after each, so a later prompt sharing part of it resumes at the last
    # snapshot inside the shared part.
    prefix_cache: bool = True
    prefix_cache_bytes: int | None = None
    prefix_page_tokens: int = DEFAULT_PAGE_TOKENS
    prefix_snapshot_interval: int | None = None

    def __post_init__(self) -> None:
        if self.max_batch < 1 or self.max_len < 2 or self.decode_steps < 1:
            raise ValueError(f"invalid engine config {self}")
        if self.speculative_tokens is not None and not 0 <= self.speculative_tokens <= MAX_SPECULATIVE_TOKENS:
            raise ValueError(f"speculative_tokens must be 0 (off) to {MAX_SPECULATIVE_TOKENS}, got "
                             f"{self.speculative_tokens}")
        if self.prompt_buckets is None:
            fitting = tuple(b for b in DEFAULT_PROMPT_BUCKETS if b <= self.max_len)
            object.__setattr__(self, "prompt_buckets", fitting or (self.max_len,))
        if not self.stream_interval_ms > 0:
            raise ValueError(f"stream_interval_ms must be > 0, got {self.stream_interval_ms}")
        if not self.prompt_buckets or any(b < 1 for b in self.prompt_buckets):
            raise ValueError(f"prompt_buckets must be positive lengths, got {self.prompt_buckets}")
        if max(self.prompt_buckets) > self.max_len:
            raise ValueError(f"prompt bucket {max(self.prompt_buckets)} exceeds max_len {self.max_len}")
        if self.prefix_snapshot_interval is not None and self.prefix_snapshot_interval not in self.prompt_buckets:
            raise ValueError(f"prefix_snapshot_interval must be one of the prompt buckets {self.prompt_buckets}, got "
                             f"{self.prefix_snapshot_interval}")
        if self.prefix_page_tokens < 1:
            raise ValueError(f"prefix_page_tokens must be >= 1, got {self.prefix_page_tokens}")
        if any(b < 4 or b % 4 for b in self.vision_buckets):
            raise ValueError(f"vision_buckets must be positive multiples of 4 (the 2 x 2 patch merge), got "
                             f"{self.vision_buckets}")

    def prefill_rows(self, bucket: int) -> tuple[int, ...]:
        """Row counts of the batched prefill programs of a prompt bucket (1 always)."""
        return tuple(r for r in PREFILL_ROWS if r == 1 or (r <= self.max_batch and r * bucket <= self.prefill_tokens))

    @property
    def decode_buckets(self) -> tuple[int, ...]:
        if self.batch_buckets:
            return tuple(sorted(set(self.batch_buckets) | {self.max_batch}))
        sizes = [1 << i for i in range(self.max_batch.bit_length()) if 1 << i < self.max_batch]
        return tuple(sizes + [self.max_batch])


@dataclasses.dataclass
class Request:
    """One prompt, tokenised, with its mRoPE positions (host numpy)."""

    input_ids: np.ndarray  # [T] int
    positions: np.ndarray  # [3, T] int (text-only: arange in every row)
    rope_delta: int
    sampling: SamplingParams
    max_new_tokens: int
    vision: VisionPayload | None = None
    # With speculative decoding: the tokens the caller predicts at cache positions 0.. (prompt, then output; -1
    # for none). Where given they replace the MTP head's drafts: acceptance tests and benchmarks use the
    # target's own continuation as an oracle.
    draft_tokens: np.ndarray | None = None


@dataclasses.dataclass
class VisionPayload:
    """A request's images/videos: packed patches, their grids (images then videos) and where each merged
    vision token sits in the prompt (the order in which the tower emits them)."""

    pixel_patches: np.ndarray  # [N, patch_dim] float32
    grids_thw: np.ndarray  # [n, 3] int
    dest_t: np.ndarray  # [N / merge^2] int32 prompt index of each merged token


@dataclasses.dataclass
class TokenEvent:
    request_index: int
    tokens: list[int]
    finished: bool
    # "stop" (eos), "length" (max_new_tokens or max_len), "cancelled" (Scheduler.cancel), None while running
    finish_reason: str | None
    steps: int = 0  # decode steps that produced these tokens (more tokens than steps: accepted drafts)
    cached_tokens: int = 0  # on a request's first event: prompt tokens the prefix cache supplied


# ----------------------------------------------------------------------------------------------- device programs


def _get_rows(x: jax.Array, rows: jax.Array | int) -> jax.Array:
    return x[:rows] if isinstance(rows, int) else x[rows]


def _step_keys(state: DecodeState, rows: jax.Array | int, step_s: jax.Array) -> jax.Array:
    # A request's stream depends only on its seed and token index, not on its batch neighbours.
    return jax.vmap(jax.random.fold_in)(_get_rows(state.keys, rows), step_s)


def prefill_program(graphdef: nnx.GraphDef, params: nnx.State, state: DecodeState, ids_bt: jax.Array,
                    positions_3bt: jax.Array, lengths_b: jax.Array, starts_b: jax.Array, slots_b: jax.Array,
                    rope_delta_b: jax.Array, sampling_b: SamplingArrays, keys_b: jax.Array, max_new_b: jax.Array,
                    eos_e: jax.Array, vision: tuple | None, speculative: tuple | None, *, fresh: bool, final: bool
                    ) -> tuple[DecodeState, jax.Array]:
    """Runs one prompt chunk per row into its slot. The final chunk samples the first token and arms the slot.

    ``vision``: (visual_md, deepstack_kmd or None, dest_m) with dest_m the flat chunk index of each vision token
    (out of range: not in this chunk, dropped). ``speculative`` (with an MTP engine): (mRoPE position [3, B] of
    the token before the chunk, the rows' draft tables [B, max_len])."""
    model: QwenVLModel = nnx.merge(graphdef, params)
    lm = model.language_model
    cos, sin = mrope_cos_sin(positions_3bt, lm.cfg)
    ctx = ForwardContext(cos, sin, lengths_b, starts_b, slots_b, fresh)
    embeds_btd, deepstack_lbtd = lm.embed_tokens(ids_bt), None
    if vision is not None:
        embeds_btd, deepstack_lbtd = fuse_vision(embeds_btd, *vision)
    hidden_btd, layers = lm.forward(embeds_btd, ctx, state.layers, deepstack_lbtd)

    t = ids_bt.shape[1]
    valid_bt = jnp.arange(t)[None, :] < lengths_b[:, None]
    seen_b = jnp.zeros((slots_b.shape[0], state.seen.shape[1]), bool) if fresh else state.seen[slots_b]
    seen_b = mark_seen(seen_b, ids_bt, valid_bt)
    lengths_after = starts_b + lengths_b
    state = state._replace(layers=layers, seen=state.seen.at[slots_b].set(seen_b),
                           lengths=state.lengths.at[slots_b].set(lengths_after))
    if state.spec is not None:
        state = state._replace(spec=prefill_mtp(model, state.spec, embeds_btd, hidden_btd, positions_3bt,
                                                speculative[0], lengths_b, starts_b, slots_b, fresh))
    if not final:
        return state, jnp.full(slots_b.shape, -1, jnp.int32)

    last_bd = hidden_btd[jnp.arange(ids_bt.shape[0]), lengths_b - 1]
    logits_bv = model.lm_logits(last_bd).astype(jnp.float32)
    step_keys = jax.vmap(jax.random.fold_in)(keys_b, lengths_after)
    token_b = sample(logits_bv, sampling_b, step_keys, seen_b)
    stopped_b = jnp.isin(token_b, eos_e) | (max_new_b <= 1) | (lengths_after + 1 >= _cache_len(state))
    state = state._replace(
        seen=state.seen.at[slots_b].set(mark_seen(seen_b, token_b[:, None])),
        rope_delta=state.rope_delta.at[slots_b].set(rope_delta_b),
        next_token=state.next_token.at[slots_b].set(token_b),
        active=state.active.at[slots_b].set(~stopped_b),
        remaining=state.remaining.at[slots_b].set(max_new_b - 1),
        keys=state.keys.at[slots_b].set(keys_b),
        sampling=jax.tree_util.tree_map(lambda s, v: s.at[slots_b].set(v), state.sampling, sampling_b),
    )
    if state.spec is not None:
        last_position_3b = jnp.take_along_axis(positions_3bt, (lengths_b - 1)[None, :, None], axis=2)[:, :, 0]
        state = state._replace(spec=first_drafts(model, state.spec, token_b, last_position_3b, lengths_after - 1,
                                                 rope_delta_b, slots_b, speculative[1]))
    return state, token_b


def vision_program(graphdef: nnx.GraphDef, params: nnx.State, patches_nd: jax.Array, vision_inputs
                   ) -> tuple[jax.Array, jax.Array | None]:
    return nnx.merge(graphdef, params).visual(patches_nd, vision_inputs)


def _cache_len(state: DecodeState) -> int:
    """Positions per slot: a request holds at most this many tokens (prompt + generated)."""
    return next(c.k.shape[1] for c in state.layers if isinstance(c, AttnCache))


def decode_program(graphdef: nnx.GraphDef, params: nnx.State, state: DecodeState, host_active_s: jax.Array,
                   eos_e: jax.Array, num_steps: jax.Array, *, steps: int, rows: int) -> tuple[DecodeState, jax.Array]:
    """``num_steps`` (<= ``steps``, a traced count) decode steps for slots [0, rows): tokens [steps, rows, T] (T
    = 1, or speculative_tokens + 1: the tokens of one step in order; -1 where a slot emitted nothing, and in the
    steps past ``num_steps``)."""
    model: QwenVLModel = nnx.merge(graphdef, params)
    lm = model.language_model
    max_len = _cache_len(state)
    sampling = jax.tree_util.tree_map(lambda x: x[:rows], state.sampling)

    def step(k: jax.Array, carry: tuple[DecodeState, jax.Array]) -> tuple[DecodeState, jax.Array]:
        state, out_kst = carry
        active_s = state.active[:rows] & host_active_s[:rows]
        token_s = state.next_token[:rows]
        start_s = state.lengths[:rows]
        keys_s = _step_keys(state, rows, start_s + 1)
        if state.spec is not None:
            state, tokens_st = speculative_step(model, state, rows, active_s, eos_e, keys_s, sampling, max_len)
            return state, out_kst.at[k].set(tokens_st)
        pos_s = start_s + state.rope_delta[:rows]
        cos, sin = mrope_cos_sin(jnp.broadcast_to(pos_s[None, :, None], (3, rows, 1)), lm.cfg)
        ctx = ForwardContext(cos, sin, active_s.astype(jnp.int32), start_s, rows, False)
        hidden, layers = lm.forward(lm.embed_tokens(token_s[:, None]), ctx, state.layers)
        logits_sv = model.lm_logits(hidden[:, 0]).astype(jnp.float32)
        # The whole [S, vocab] presence mask goes in: it is sliced (read) only if a row has a repetition penalty.
        new_s = sample(logits_sv, sampling, keys_s, state.seen)

        lengths_s = start_s + active_s
        remaining_s = state.remaining[:rows] - active_s
        done_s = jnp.isin(new_s, eos_e) | (remaining_s <= 0) | (lengths_s + 1 >= max_len)
        state = state._replace(
            layers=layers,
            lengths=state.lengths.at[:rows].set(lengths_s),
            remaining=state.remaining.at[:rows].set(remaining_s),
            next_token=state.next_token.at[:rows].set(jnp.where(active_s, new_s, token_s)),
            active=state.active.at[:rows].set(active_s & ~done_s),
            seen=mark_seen(state.seen, new_s[:, None], active_s[:, None]),
        )
        return state, out_kst.at[k, :, 0].set(jnp.where(active_s, new_s, -1))

    tokens_per_step = 1 if state.spec is None else state.spec.drafts.shape[1] + 1
    out = jnp.full((steps, rows, tokens_per_step), -1, jnp.int32)

    # The loop ends early once no row is active: a step reads every weight whether or not a row uses it, and
    # the host keeps a call queued behind the one it reads, so the call after a request's last token (and the
    # steps of a call past it) would otherwise cost a full pass over the weights each, for nothing.
    def running(carry: tuple[jax.Array, DecodeState, jax.Array]) -> jax.Array:
        k, state, _ = carry
        return (k < jnp.minimum(num_steps, steps)) & jnp.any(state.active[:rows] & host_active_s[:rows])

    def body(carry: tuple[jax.Array, DecodeState, jax.Array]) -> tuple[jax.Array, DecodeState, jax.Array]:
        k, state, out = carry
        return k + 1, *step(k, (state, out))

    _, state, out = jax.lax.while_loop(running, body, (jnp.int32(0), state, out))
    return state, out


# ----------------------------------------------------------------------------------------------- host side


def _vision_after(payload: VisionPayload | None, start: int, cfg) -> VisionPayload | None:
    """The images and videos of a request with tokens at or after prompt index ``start`` (those before it come
    from the prefix cache), or None when no vision tokens remain."""
    if payload is None or start == 0:
        return payload
    patches, tokens = vision_spans(payload, cfg.spatial_merge_size)
    keep = [i for i, t in enumerate(tokens) if payload.dest_t[t.stop - 1] >= start]
    if not keep:
        return None
    if len(keep) == len(tokens):
        return payload
    return VisionPayload(np.concatenate([payload.pixel_patches[patches[i]] for i in keep]),
                         np.asarray(payload.grids_thw).reshape(-1, 3)[keep],
                         np.concatenate([payload.dest_t[tokens[i]] for i in keep]))


class Engine:
    """Owns the decode state and the compiled programs of one model; runs requests to completion."""

    def __init__(self, graphdef: nnx.GraphDef, params: nnx.State, config: EngineConfig = EngineConfig(),
                 eos_ids: Sequence[int] = ()):
        self.config = config
        if len(eos_ids) > 8:
            raise ValueError(f"at most 8 end-of-sequence ids, got {list(eos_ids)}")
        self.eos_ids = tuple(int(i) for i in eos_ids)
        # Fixed length so the stop set is data, not shape.
        self._eos = np.array(list(self.eos_ids) + [-1] * (8 - len(self.eos_ids)), np.int32)
        self.graphdef, self.params = graphdef, params
        model: QwenVLModel = nnx.merge(graphdef, params)
        text = model.language_model
        self.vocab_size = text.cfg.vocab_size
        self.scratch_slot = config.max_batch  # warm-up writes here, never into a request's slot
        slots = config.max_batch + 1
        dtype = text.embed_tokens.weight.get_value().dtype
        k = config.speculative_tokens
        if k is None:
            k = 0
            if model.mtp is not None and config.max_batch <= SPECULATIVE_MAX_BATCH:
                k = DEFAULT_SPECULATIVE_TOKENS_MOE if model.cfg.is_moe else DEFAULT_SPECULATIVE_TOKENS
        self.speculative_tokens = k  # the k in effect
        if k and model.mtp is None:
            raise ValueError(
                f"speculative_tokens={k} needs the MTP head of a Qwen3.5 checkpoint (its mtp.* weights), and "
                f"this {model.cfg.model_type} model has none (a checkpoint converted before qwenvl-jax read "
                "the MTP head must be converted again)")

        def make_state() -> DecodeState:
            spec = None
            if k:
                spec = SpecState(init_mtp_caches(text.cfg, slots, config.max_len, dtype),
                                 jnp.zeros((slots, k), jnp.int32),
                                 jnp.zeros((slots, text.cfg.hidden_size), dtype),
                                 jnp.full((slots, config.max_len), -1, jnp.int32))
            return DecodeState(
                layers=init_layer_caches(text.cfg, slots, config.max_len, dtype),
                lengths=jnp.zeros(slots, jnp.int32), rope_delta=jnp.zeros(slots, jnp.int32),
                next_token=jnp.zeros(slots, jnp.int32), active=jnp.zeros(slots, bool),
                remaining=jnp.zeros(slots, jnp.int32), keys=request_keys([0] * slots),
                seen=jnp.zeros((slots, self.vocab_size), bool),
                sampling=jax.tree_util.tree_map(jnp.asarray, sampling_arrays([], slots)),
                spec=spec,
            )

        mesh = mesh_of(params)
        placed = getattr(jax.tree_util.tree_leaves(params)[0], "sharding", None)  # None: abstract parameters
        device = None if placed is None else jax.sharding.SingleDeviceSharding(next(iter(placed.device_set)))
        with explain_out_of_memory(
                f"The decode state of max_batch={config.max_batch} slots (and one for warm-up) x max_len="
                f"{config.max_len} tokens", lambda: tree_bytes(jax.eval_shape(make_state)),
                "Lower max_batch or max_len (QwenVL.configure / EngineConfig), or split the model over devices "
                "(load(..., tensor_parallel=N))."):
            self.state = make_state()
            if mesh is not None:  # tensor / expert parallel: the state joins the mesh
                self.state = shard_state(self.state, model.cfg, mesh)
            else:
                # Committed to the device, as every call's outputs are: a program first called with uncommitted
                # arrays is compiled again for the committed ones (the first request after warm-up recompiled the
                # program warm-up had compiled first). The device, not a weight's sharding: parameters placed on a
                # one-device mesh carry specs (P('tensor', None)) that a state leaf's rank may not take. Abstract
                # parameters (shapes only, for lowering) have no sharding: the state stays on the default device.
                self.state = jax.device_put(self.state, device)
            jax.block_until_ready(self.state)
        # The programs take the weights as a flat list: a call then neither hashes the graph definition as a static
        # argument nor flattens the nnx.State (measured on a 2-core CPU: 3 and 0.7 ms of host time per call, for
        # the ~430 leaves of Qwen3.5-9B's structure).
        self._weights, weights_def = jax.tree_util.tree_flatten(params)

        def over_weights(program):
            def run(weights: list[jax.Array], *args, **kwargs):
                with mesh_context(mesh):  # traced on the mesh: the Pallas kernels run per device
                    return program(graphdef, jax.tree_util.tree_unflatten(weights_def, weights), *args, **kwargs)
            return run

        # The state keeps its shardings from call to call, else the outputs may take others and the next call,
        # seeing new input types, compiles again: on a mesh XLA may pick other splits, and with weights on a
        # one-device mesh (no mesh here) the outputs joined the weights' mesh (warm-up compiled for the state as
        # made; the first request compiled every program it ran again: 10 s of a 27B model's first TTFT).
        # Abstract parameters pin nothing: their programs are lowered for devices the state is not on
        # (bench/kernel_census.py compiles for a GPU that is not attached).
        outputs = replicated(mesh) if mesh is not None else device
        keep = {} if outputs is None else dict(
            out_shardings=(jax.tree_util.tree_map(lambda x: x.sharding, self.state), outputs))
        self._prefill = jax.jit(over_weights(prefill_program), static_argnames=("fresh", "final"), donate_argnums=1,
                                **keep)
        self._decode = jax.jit(over_weights(decode_program), static_argnames=("steps", "rows"), donate_argnums=1,
                               **keep)
        self._vision = jax.jit(over_weights(vision_program), compiler_options=VISION_COMPILER_OPTIONS)
        # The OnlineEngine serving this engine, if any: then it alone drives the slots (see Scheduler).
        self.online: object | None = None
        self.vision_cfg = model.cfg.vision
        self.compile_seconds = 0.0
        largest = max(config.prompt_buckets)
        interval = config.prefix_snapshot_interval or largest
        self.prefix: PrefixCache | None = None
        if config.prefix_cache:
            self.prefix = PrefixCache(self.state, config.max_len, config.prefix_page_tokens, config.prefix_cache_bytes,
                                      interval)
        # Prompt tokens per chunk of a chunked prefill: a hybrid model with a prefix cache snapshots after each.
        hybrid_cache = self.prefix is not None and self.prefix.hybrid
        self.chunk_tokens = interval if hybrid_cache and config.chunked_prefill else largest

    @property
    def state_bytes(self) -> int:
        return tree_bytes(self.state)

    def compiled_programs(self) -> int:
        """How many executables the two programs hold (a steady-state workload must not change this)."""
        prefix = 0 if self.prefix is None else self.prefix.compiled_programs()
        return self._prefill._cache_size() + self._decode._cache_size() + self._vision._cache_size() + prefix

    # ---- warm-up: compile every bucket, touching only the scratch slot
    def warmup(self, progress: bool = True, vision: bool = True) -> float:
        """Compiles every program the config can call (vision ones too unless ``vision=False``); returns seconds."""
        from tqdm.auto import tqdm

        t0 = time.perf_counter()
        cfg = self.config
        variants = [(b, True, True) for b in cfg.prompt_buckets]
        big = self.chunk_tokens
        if cfg.chunked_prefill:
            variants += [(big, True, False), (big, False, False), (big, False, True)]
        if self.prefix is not None:  # the rest of a prompt after a cache hit, when it fits one bucket
            variants += [(b, False, True) for b in cfg.prompt_buckets if (b, False, True) not in variants]
        scratch = Request(np.zeros(1, np.int32), np.zeros((3, 1), np.int32), 0, SamplingParams(), 1)
        requests = [(scratch, v) for v in variants]
        vision_only = []  # extra vision-program shapes: prefill programs depend on the bucket alone
        if self.vision_cfg is not None and vision:
            merge = self.vision_cfg.spatial_merge_size
            for n in cfg.vision_buckets:
                # One frame of every power-of-two patch count below the bucket and one filling it: the attention
                # layouts of single images (a frame's layout is its patch count rounded up to a power of two),
                # each frame as square as it can be, as images are: their rotary table rows (from the longer
                # side) and windows are then those of real images, which a 2 x 2048 frame's are not. Other
                # layouts (several images, video frames, long thin images) compile once on first sight.
                counts = sorted({1 << i for i in range(merge.bit_length() * 2 - 1, n.bit_length()) if 1 << i < n}
                                | {n})
                payloads = [VisionPayload(np.zeros((n, self.vision_cfg.patch_dim), np.float32),
                                          np.array([[1, *_squarest_frame(count, merge)]]),
                                          np.arange(count // merge**2, dtype=np.int32))
                            for count in counts]
                with_vision = dataclasses.replace(scratch, vision=payloads[-1])
                # A prompt holds all its vision tokens, so only buckets that fit them (or chunking) can occur.
                requests += [(with_vision, v) for v in variants if v[0] >= n // merge**2 or v[0] == big]
                vision_only += payloads[:-1]
        batched = [(bucket, rows) for bucket in cfg.prompt_buckets for rows in cfg.prefill_rows(bucket) if rows > 1]
        bar = tqdm(total=len(requests) + len(batched) + len(vision_only) + len(cfg.decode_buckets), desc="warm-up",
                   disable=not progress)
        for payload in vision_only:
            self._vision_embeds(payload)
            bar.update()
        for req, (bucket, fresh, final) in requests:
            embeds = self._vision_embeds(req.vision) if req.vision is not None else None
            self._run_prefill([req], [self.scratch_slot], 0, bucket, fresh, final, embeds)
            bar.update()
        for bucket, rows in batched:  # every row in the scratch slot: the writes collide there, harmlessly
            self._run_prefill([scratch] * rows, [self.scratch_slot] * rows, 0, bucket, True, True)
            bar.update()
        if self.prefix is not None:
            self.state = self.prefix.warmup(self.state, self.scratch_slot)
        for rows in cfg.decode_buckets:
            self.state, out = self._decode(self._weights, self.state,
                                           np.zeros(cfg.max_batch + 1, bool), self._eos, np.int32(cfg.decode_steps),
                                           steps=cfg.decode_steps, rows=rows)
            bar.update()
        jax.block_until_ready(self.state)
        bar.close()
        self.compile_seconds = time.perf_counter() - t0
        return self.compile_seconds

    def _vision_embeds(self, payload: VisionPayload) -> tuple:
        """Runs the vision tower on a request's patches padded to a patch bucket (padding patches attend only
        among themselves and their merged tokens are dropped at the scatter)."""
        v = self.vision_cfg
        n = len(payload.pixel_patches)
        bucket = vision_bucket(n, self.config.vision_buckets)
        grids = np.asarray(payload.grids_thw)
        rows = max(self.config.vision_table_rows, 1 << (int(grids[:, 1:].max()) - 1).bit_length())
        vision_inputs = prepare_vision_inputs(v, grids, pad_to=bucket, table_rows=rows)
        patches = np.zeros((bucket, v.patch_dim), np.float32)
        patches[:n] = payload.pixel_patches
        visual_md, deepstack_kmd = self._vision(self._weights, patches, vision_inputs)
        dest = np.full(bucket // v.spatial_merge_size**2, np.iinfo(np.int32).max, np.int64)
        dest[: len(payload.dest_t)] = payload.dest_t
        return visual_md, deepstack_kmd, dest

    def _run_prefill(self, reqs: Sequence[Request], slots: Sequence[int], start: int, bucket: int, fresh: bool,
                     final: bool, vision: tuple | None = None) -> jax.Array:
        """One prefill call: tokens [start, start + bucket) of each request, a row each, into its slot. ``vision``
        (the embeddings of a single request's images) needs a single request."""
        chunk_vision = None
        if vision is not None:
            assert len(reqs) == 1, "vision inputs come one request per prefill call"
            visual_md, deepstack_kmd, dest = vision
            # Chunk-relative positions; tokens of other chunks point past the chunk and are dropped.
            local = np.where((dest >= start) & (dest < start + bucket), dest - start, bucket).astype(np.int32)
            chunk_vision = (visual_md, deepstack_kmd, local)
        rows = len(reqs)
        lengths = np.array([min(bucket, len(r.input_ids) - start) for r in reqs], np.int32)
        ids = np.zeros((rows, bucket), np.int32)
        pos = np.zeros((3, rows, bucket), np.int32)
        for row, (req, n) in enumerate(zip(reqs, lengths)):
            ids[row, :n] = req.input_ids[start : start + n]
            pos[:, row, :n] = req.positions[:, start : start + n]
        speculative = None
        if self.state.spec is not None:
            prev_position = np.stack([r.positions[:, start - 1] if start else np.zeros(3, np.int32) for r in reqs], 1)
            table = np.full((rows, self.config.max_len), -1, np.int32)
            for row, req in enumerate(reqs):
                if req.draft_tokens is not None:
                    given = np.asarray(req.draft_tokens, np.int32)[: self.config.max_len]
                    table[row, : len(given)] = given
            speculative = (prev_position.astype(np.int32), table)
        self.state, token = self._prefill(
            self._weights, self.state, ids, pos, lengths, np.full(rows, start, np.int32),
            np.asarray(slots, np.int32), np.array([r.rope_delta for r in reqs], np.int32),
            sampling_arrays([r.sampling for r in reqs]), request_keys([r.sampling.seed for r in reqs]),
            np.array([r.max_new_tokens for r in reqs], np.int32), self._eos, chunk_vision, speculative, fresh=fresh,
            final=final)
        return token

    def content(self, req: Request) -> np.ndarray:
        """What the prefix cache matches the request by (``prefix_cache.request_content``)."""
        merge = 1 if self.vision_cfg is None else self.vision_cfg.spatial_merge_size
        return request_content(req.input_ids, req.vision, merge)

    def _prefill_request(self, req: Request, slot: int, content: np.ndarray | None = None, hit: Hit | None = None
                         ) -> jax.Array:
        """Restores a prefix cache hit into the slot, then prefills the rest of the prompt in one bucket if it fits,
        else in chunks; returns the first token. With a prefix cache the prompt is then cached (``content``)."""
        t = len(req.input_ids)
        start = 0
        if self.prefix is not None and content is None:
            content = self.content(req)
        if self.prefix is not None and hit is None:
            hit = self.prefix.lookup(content, t - 1)
        if hit is not None and hit.tokens:
            self.state = self.prefix.restore(self.state, slot, hit, req.input_ids)
            start = hit.tokens
        vision = self._vision_embeds(payload) if (payload := _vision_after(req.vision, start, self.vision_cfg)) \
            else None
        chunk = self.chunk_tokens
        if t - start <= chunk and (bucket := self._bucket(t - start)) is not None:
            token = self._run_prefill([req], [slot], start, bucket, start == 0, True, vision)
        else:
            for s in range(start, t, chunk):
                final = s + chunk >= t
                token = self._run_prefill([req], [slot], s, chunk, s == 0, final, vision)
                if not final and self.prefix is not None and self.prefix.hybrid:
                    self.prefix.save(self.state, slot, content, s + chunk, snapshot=True)
        if self.prefix is not None:
            self.prefix.save(self.state, slot, content, t, snapshot=True)
        return token

    def _bucket(self, tokens: int) -> int | None:
        """The smallest prompt bucket holding ``tokens``, None when the prompt must be chunked."""
        return min((b for b in self.config.prompt_buckets if b >= tokens), default=None)

    def _prefill_admitted(self, admitted: Sequence[tuple[Request, int, np.ndarray | None]]
                          ) -> Iterator[tuple[jax.Array, list[int], list[int]]]:
        """Prefills newly admitted (request, slot, content) triples (content: ``content(request)``, None without a
        prefix cache): (first tokens, their slots, prompt tokens each took from the prefix cache) per call. Text
        prompts that fit one chunk and hit nothing in the prefix cache share calls of the largest row counts that
        fit; the others are prefilled alone."""
        groups: dict[int, list[tuple[Request, int, np.ndarray | None]]] = collections.defaultdict(list)
        for req, slot, content in admitted:
            t = len(req.input_ids)
            hit = self.prefix.lookup(content, t - 1) if self.prefix is not None else None
            bucket = self._bucket(t)
            if req.vision is None and bucket is not None and t <= self.chunk_tokens and not (hit and hit.tokens):
                groups[bucket].append((req, slot, content))
            else:
                yield self._prefill_request(req, slot, content, hit), [slot], [hit.tokens if hit else 0]
        for bucket, group in groups.items():
            while group:
                rows = max(r for r in self.config.prefill_rows(bucket) if r <= len(group))
                part, group = group[:rows], group[rows:]
                slots = [slot for _, slot, _ in part]
                token = self._run_prefill([req for req, _, _ in part], slots, 0, bucket, True, True)
                if self.prefix is not None:
                    for req, slot, content in part:
                        self.prefix.save(self.state, slot, content, len(req.input_ids), snapshot=True)
                yield token, slots, [0] * len(slots)

    def worth_waiting(self, content: np.ndarray, earlier: Sequence[np.ndarray]) -> bool:
        """Whether a request sharing a prefix with ``earlier`` ones (admitted this iteration, not yet prefilled)
        would reuse more of it by waiting until they are: then it is admitted at the next iteration."""
        limit = len(content) - 1
        shared = max(common_prefix(content, e) for e in earlier)
        # A hybrid model resumes only at a snapshot: the earlier prompts' chunk boundaries and ends.
        reachable = min(shared, limit)
        if self.prefix.hybrid:
            ends = [len(e) for e in earlier if len(e) <= reachable and common_prefix(content, e) == len(e)]
            reachable = max([reachable // self.chunk_tokens * self.chunk_tokens] + ends)
        cached = self.prefix.lookup(content, limit, touch=False).tokens
        return reachable >= cached + (1 if self.prefix.hybrid else self.prefix.page_tokens)

    def validate(self, req: Request) -> None:
        t = len(req.input_ids)
        if t == 0:
            raise ValueError("the prompt is empty")
        if t + 1 > self.config.max_len:
            raise ValueError(f"the prompt has {t} tokens but the engine's max_len is {self.config.max_len} "
                             "(prompt + at least one new token must fit; raise it with configure(max_len=...) or "
                             "--max-len)")
        if t > max(self.config.prompt_buckets) and not self.config.chunked_prefill:
            raise ValueError(f"the prompt has {t} tokens, more than the largest prompt bucket "
                             f"{max(self.config.prompt_buckets)}, and chunked prefill is off")
        if req.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {req.max_new_tokens}")
        if req.input_ids.min() < 0 or req.input_ids.max() >= self.vocab_size:
            raise ValueError(f"prompt holds token ids outside the vocabulary [0, {self.vocab_size})")

    # ---- the loop
    def run(self, requests: Sequence[Request], stream: bool = False) -> Iterator[TokenEvent]:
        """Generates for every request (continuous batching over ``max_batch`` slots); yields token events in
        order, ``request_index`` the request's position in ``requests``. See ``Scheduler``."""
        return Scheduler(self, requests, stream).events()


@dataclasses.dataclass
class _Call:
    """A dispatched call whose tokens the host has not read yet."""

    kind: str  # "first": a prefill's first tokens [rows]; "decode": [steps, rows, tokens a step]
    tokens: jax.Array
    slots: list[int]  # the slot of each row
    # The request each row's slot held at dispatch: a slot freed by a cancel and taken by a new request before
    # this call is read must not hand the old request's tokens to the new one.
    owners: list[int | None]
    dispatched: float = 0.0
    cached: list[int] | None = None  # "first": prompt tokens each row took from the prefix cache


class Scheduler:
    """The host loop over an engine's slots, one iteration per ``step()``: between iterations requests may be
    submitted and cancelled (continuous batching online). One thread drives a scheduler: ``Engine.run`` for a
    fixed list, ``qwenvl_jax.online.OnlineEngine`` for requests that arrive at any time.

    Each iteration frees the slots of cancelled requests, admits waiting requests into free slots and prefills
    them, reads their first tokens, dispatches one decode call for every running slot and reads the calls the
    device has finished. Steady state performs no compilation and no device->host transfer but the token ids.
    ``stream``: decode calls sized to end every ``stream_interval_ms``, so each token reaches the caller that
    soon, and none queued behind the one running, so a new request waits for one call at most. Where a stream's
    device time goes: ``decode_calls`` counts the decode calls dispatched, ``host_gap_s`` the host's seconds from
    reading a decode call to dispatching the next in iterations that admit no request (the device idles then)."""

    def __init__(self, engine: Engine, requests: Sequence[Request] = (), stream: bool = False):
        if engine.online is not None:
            raise RuntimeError("this engine is being served by an OnlineEngine (qwenvl serve), which alone drives "
                               "its slots: send requests to the server, or close it first")
        self.engine = engine
        self.stream = stream
        cfg = engine.config
        self._step_ms: collections.deque[float] = collections.deque(maxlen=STEP_TIME_WINDOW)
        self._step_rows = 0  # the row bucket those step times were measured at
        self._running_at_call = 0  # requests holding a slot when the last decode call went out
        self.decode_calls = 0
        self.host_gap_s = 0.0
        self._decode_read_at: float | None = None
        self._pending: collections.deque[int] = collections.deque()
        self._requests: dict[int, Request] = {}  # submitted and not yet ended
        self._slot_req: dict[int, int] = {}  # slot -> request id
        self._produced: collections.Counter = collections.Counter()
        self._host_active = np.zeros(cfg.max_batch + 1, bool)
        self._inflight: collections.deque[_Call] = collections.deque()
        self._cancelled: set[int] = set()
        # With a prefix cache: each request's content (what the cache matches). A request that ends by itself is
        # cached whole, prompt and output, so its tokens are kept as they come; not with speculative decoding,
        # whose slot's MTP state does not line up with that point (only prompts are cached there).
        self._content: dict[int, np.ndarray] = {}
        self._cache_outputs = engine.prefix is not None and not engine.speculative_tokens
        self._tokens: dict[int, list[int]] = collections.defaultdict(list)
        for i, req in enumerate(requests):
            self.submit(i, req)

    def submit(self, request_id: int, req: Request) -> None:
        """Queues a request (checked now: a ValueError names what is wrong); its events carry ``request_id``."""
        self.engine.validate(req)
        if request_id in self._requests:
            raise ValueError(f"request id {request_id} is already running")
        self._requests[request_id] = req
        self._pending.append(request_id)

    def cancel(self, request_id: int) -> None:
        """Ends a request at the next ``step()``, which frees its slot before any further call and yields its last
        event (finish_reason "cancelled"). Unknown or ended requests are ignored."""
        if request_id in self._requests:
            self._cancelled.add(request_id)

    @property
    def busy(self) -> bool:
        """Whether requests are waiting or running, or calls remain to be read."""
        return bool(self._requests or self._inflight)

    @property
    def running(self) -> int:
        return len(self._slot_req)

    def events(self) -> Iterator[TokenEvent]:
        """Steps until every request has ended."""
        while self.busy:
            yield from self.step()

    def _at_length(self, request_id: int, tokens: int) -> bool:
        """Whether ``tokens`` new tokens end the request by length (max_new_tokens or the context)."""
        req = self._requests[request_id]
        return tokens >= req.max_new_tokens or len(req.input_ids) + tokens >= self.engine.config.max_len

    def _content_of(self, request_id: int) -> np.ndarray:
        if request_id not in self._content:
            self._content[request_id] = self.engine.content(self._requests[request_id])
        return self._content[request_id]

    def _finish(self, request_id: int) -> None:
        self._requests.pop(request_id)
        self._produced.pop(request_id, None)
        self._content.pop(request_id, None)
        self._tokens.pop(request_id, None)
        slot = next((s for s, i in self._slot_req.items() if i == request_id), None)
        if slot is None:
            self._pending.remove(request_id)
        else:
            self._host_active[slot] = False
            del self._slot_req[slot]

    def step(self) -> Iterator[TokenEvent]:
        """One iteration of the loop; yields the token events it reads, as it reads them."""
        engine, cfg = self.engine, self.engine.config
        for i in sorted(self._cancelled & self._requests.keys()):
            self._finish(i)
            yield TokenEvent(i, [], True, "cancelled")
        self._cancelled.clear()
        admitted, waiting = [], []
        prefix = engine.prefix
        while self._pending and len(self._slot_req) < cfg.max_batch:
            i = self._pending.popleft()
            content = self._content_of(i) if prefix is not None else None
            # A request sharing a prefix with one admitted just now waits for it to be cached, then reuses it.
            if admitted and prefix is not None and engine.worth_waiting(content, [c for _, _, c in admitted]):
                waiting.append(i)
                continue
            slot = min(set(range(cfg.max_batch)) - set(self._slot_req))
            self._slot_req[slot] = i
            self._host_active[slot] = True
            admitted.append((self._requests[i], slot, content))
        self._pending.extendleft(reversed(waiting))
        for tokens, slots, cached in engine._prefill_admitted(admitted):
            self._inflight.append(_Call("first", tokens, slots, [self._slot_req[s] for s in slots], cached=cached))
        # A read waits for the calls dispatched before it (measured on an H100 with a decode call queued behind
        # the prefill: Qwen3.5-9B's 1K-token TTFT was 156 ms with 16-step calls, 61 ms with 4-step ones). So
        # first tokens are read before the next decode call goes out, and a stream keeps no call queued: a
        # token then waits for one call, not two.
        queued = 0 if self.stream else 1
        while any(call.kind == "first" for call in self._inflight):
            yield from self._read(self._inflight.popleft())
        # A request that ends with its first token needs no decode call.
        decoding = any(self._produced[i] > 0 or not self._at_length(i, 1) for i in self._slot_req.values())
        if decoding:
            rows = min(b for b in cfg.decode_buckets if b > max(self._slot_req))
            # Streaming, a slot freed since the last call and not refilled may be about to be (a client that sends
            # its next request when one ends): a call of a quarter of the interval admits that request that much
            # sooner, where a whole call would hold the slot empty for up to stream_interval_ms.
            freed = len(self._slot_req) < self._running_at_call
            steps = self._steps_within(cfg.stream_interval_ms / (4 if freed else 1))
            self._running_at_call = len(self._slot_req)
            dispatched = time.perf_counter()
            if self._decode_read_at is not None and not admitted:
                self.host_gap_s += dispatched - self._decode_read_at
            self._decode_read_at = None
            self.decode_calls += 1
            engine.state, out = engine._decode(engine._weights, engine.state, self._host_active.copy(), engine._eos,
                                               np.int32(steps), steps=cfg.decode_steps, rows=rows)
            slots = list(range(rows))
            self._inflight.append(_Call("decode", out, slots, [self._slot_req.get(s) for s in slots],
                                        dispatched=dispatched))
        # Otherwise keep one decode call queued on the device while the host reads the one before it.
        while self._inflight and (len(self._inflight) > queued or not decoding):
            yield from self._read(self._inflight.popleft())

    def _steps_within(self, ms: float) -> int:
        """Steps of the next decode call: streaming, as many as end within ``ms`` at the step time (one until a
        call has measured it: streams start with one-token calls); otherwise ``decode_steps``."""
        cfg = self.engine.config
        if not self.stream:
            return cfg.decode_steps
        if not self._step_ms:
            return 1
        return int(np.clip(ms // min(self._step_ms), 1, cfg.decode_steps))

    def _cache_finished(self, request_id: int, slot: int) -> None:
        """Caches a request that ended by itself: its slot holds the state after the prompt and every output
        token but the last (sampled, never fed back), the same on the device as here."""
        tokens = self._tokens[request_id]
        if len(tokens) < 2:
            return
        content = np.concatenate([self._content_of(request_id), np.asarray(tokens[:-1], np.int64)])
        self.engine.prefix.save(self.engine.state, slot, content, len(content), snapshot=True)

    def _read(self, call: _Call) -> Iterator[TokenEvent]:
        with jax.transfer_guard_device_to_host("allow"):  # the one transfer steady state makes
            tokens = jax.device_get(call.tokens)
        read_at = time.perf_counter()
        if self.stream and call.kind == "decode":
            # No call is queued while streaming, so dispatch to read is this call's time on the device, plus any
            # wait of this thread for the GIL once the tokens are there. That wait only adds, so the least of the
            # recent calls is the step time. Sized from the last call alone, Qwen3.5-9B's 64-row calls carried 2-2.6
            # steps behind the server (whose event loop holds the GIL) where in-process they carried 3 (~12.4 ms a
            # step, 3 to a 40 ms call; 13.3 ms tips it to 2), and paid the per-call costs 1.2-1.5x as often.
            # A call ends early once no slot is active: its time is that of the steps it ran, those with a token.
            ran = int((tokens[..., 0] >= 0).any(axis=1).sum())
            self._decode_read_at = None if self._inflight else read_at  # the device idles from here, unless queued
            if ran:
                if len(call.slots) != self._step_rows:
                    self._step_ms.clear()
                    self._step_rows = len(call.slots)
                self._step_ms.append(1e3 * (read_at - call.dispatched) / ran)
        steps_rows_t = tokens.reshape(1, -1, 1) if call.kind == "first" else tokens  # [steps, rows, tokens a step]
        eos_ids = self.engine.eos_ids
        for col, (slot, i) in enumerate(zip(call.slots, call.owners)):
            if i is None or self._slot_req.get(slot) != i:  # no request, or one that has ended since
                continue
            row_st = steps_rows_t[:, col]
            steps = int((row_st[:, 0] >= 0).sum()) if call.kind == "decode" else 0
            new, reason = [], None
            for tok in row_st.reshape(-1):
                if tok < 0:  # a step's unused entries, or steps after the request ended
                    continue
                new.append(int(tok))
                self._produced[i] += 1
                if tok in eos_ids:
                    reason = "stop"
                elif self._at_length(i, self._produced[i]):
                    reason = "length"
                if reason:
                    break
            if self._cache_outputs:
                self._tokens[i] += new
                if reason:
                    self._cache_finished(i, slot)
            if reason:
                self._finish(i)
            if new or reason:
                yield TokenEvent(i, new, reason is not None, reason, steps,
                                 call.cached[col] if call.kind == "first" else 0)
