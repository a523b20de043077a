"""``generate()``: prompts, chat messages or token ids (+ images / videos) in, text and token ids out.

Host work per request: chat template, image/video preprocessing, mRoPE positions; then the engine runs it. With
``stream=True`` text deltas are yielded as tokens arrive (never splitting a multi-byte character). Token ids with
HF-named vision arrays need no tokenizer or processor files; results then carry token ids and ``text`` is None.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import jax
import numpy as np

from qwenvl_jax.detokenize import StreamingDetokenizer
from qwenvl_jax.engine import Engine, Request, Scheduler, TokenEvent, VisionPayload
from qwenvl_jax.models.multimodal import pack_vision
from qwenvl_jax.models.rope_index import get_rope_index
from qwenvl_jax.sampling import SamplingParams

if TYPE_CHECKING:
    from qwenvl_jax.config import ModelConfig
    from qwenvl_jax.processing import Processor

_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                   "/jax/core/compile/backend_compile_duration")
_compile_seconds = [0.0]  # process-wide total, read before and after a call


def _count_compile(event: str, seconds: float, **_) -> None:
    if event in _COMPILE_EVENTS:
        _compile_seconds[0] += seconds


jax.monitoring.register_event_duration_secs_listener(_count_compile)


class GenerationModel(Protocol):
    """What generate() needs of a model: ``QwenVL`` provides it (a protocol, so that this module, which QwenVL
    calls, does not import it back)."""

    config: ModelConfig
    max_vision_patches: int

    @property
    def processor(self) -> Processor: ...

    @property
    def tokenizer(self) -> Any | None: ...

    def require_tokenizer(self, needed_for: str) -> Any: ...

    def engine(self) -> Engine: ...


@dataclasses.dataclass
class GenerationStats:
    prompt_tokens: int
    new_tokens: int
    ttft_s: float  # request submitted -> first token on the host
    prefill_tok_s: float  # prompt tokens / time to first token
    decode_tok_s: float  # new tokens after the first / time after the first token
    compile_s: float  # tracing + compilation inside this call (0 once every bucket it used was compiled)
    total_s: float
    # Ended by the engine's max_len (prompt + new tokens) before max_new_tokens; a warning says so too.
    truncated_by_max_len: bool
    # Speculative decoding (Engine.speculative_tokens = k > 0), else None: tokens after the first per decode step
    # (1 to k + 1), and the share of drafts accepted, (tokens_per_step - 1) / k.
    tokens_per_step: float | None = None
    draft_acceptance: float | None = None
    cached_tokens: int = 0  # prompt tokens taken from the prefix cache (not prefilled)


@dataclasses.dataclass
class GenerationResult:
    # None when the checkpoint has no tokenizer files (token ids in, token ids out). Excludes the end-of-sequence
    # token and a stop string.
    text: str | None
    # Every generated token, ending with the end-of-sequence token or with the token that completed a stop string.
    token_ids: list[int]
    finish_reason: str  # "stop" (end-of-sequence token or a stop string) or "length"
    stats: GenerationStats


def _is_conversation(x: Any) -> bool:
    return isinstance(x, Sequence) and not isinstance(x, str) and bool(x) and isinstance(x[0], Mapping)


def _user_message(prompt: str, images: Sequence, videos: Sequence) -> list[dict]:
    content = [{"type": "image", "image": im} for im in images] + [{"type": "video", "video": v} for v in videos]
    return [{"role": "user", "content": content + [{"type": "text", "text": prompt}]}]


def build_requests(model: GenerationModel, prompts: Any, *, images: Sequence | None, videos: Sequence | None,
                   input_ids: Sequence[Sequence[int]] | None, vision_arrays: Mapping[str, Any],
                   sampling: SamplingParams, max_new_tokens: int) -> tuple[list[Request], bool]:
    """(requests, batched): one request per prompt / conversation / row of ``input_ids``."""
    if input_ids is not None:
        if prompts is not None or images or videos:
            raise ValueError("pass either input_ids (with HF-named vision arrays) or prompts/messages, not both")
        if len(input_ids) == 0:
            raise ValueError("input_ids is empty: pass a prompt's token ids (a list of ints), or a list of such "
                             "rows for a batch")
        batched = np.ndim(input_ids[0]) > 0
        rows = [np.asarray(r) for r in input_ids] if batched else [np.asarray(input_ids)]
        if empty := [k for k, row in enumerate(rows) if row.size == 0]:
            raise ValueError(f"input_ids row(s) {empty} hold no tokens: every prompt needs at least one")
        if len(rows) != 1 and any(v is not None for v in vision_arrays.values()):
            raise ValueError("vision arrays with input_ids are supported for a single row")
        return [_request(model, r, vision_arrays, sampling, max_new_tokens) for r in rows], batched

    if prompts is None:
        raise ValueError("nothing to generate from: pass a prompt, chat messages or input_ids")
    batched = not isinstance(prompts, str) and not _is_conversation(prompts)
    items = list(prompts) if batched else [prompts]
    if batched and (images or videos):
        raise ValueError("images=/videos= go with a single prompt; in a batch put them in each conversation")
    processor = model.processor
    requests = []
    for item in items:
        messages = item if _is_conversation(item) else _user_message(str(item), images or [], videos or [])
        out = processor(messages)
        arrays = {k: getattr(out, k) for k in ("pixel_values", "image_grid_thw", "pixel_values_videos",
                                                "video_grid_thw", "second_per_grid_ts")}
        requests.append(_request(model, out.input_ids[0], arrays, sampling, max_new_tokens))
    return requests, batched


def _request(model: GenerationModel, ids: np.ndarray, arrays: Mapping[str, Any], sampling: SamplingParams,
             max_new_tokens: int) -> Request:
    cfg = model.config
    ids = np.asarray(ids)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"input_ids must be integer rows, got {ids.dtype} {ids.shape}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    ids_bt = ids[None].astype(np.int32)
    real_bt = np.ones_like(ids_bt, bool)
    # Packed without the tower's tables: the engine makes them per patch bucket (made here as well, they cost
    # host time each request and compiled their eager ops at the first image after warm-up).
    packed = pack_vision(cfg, ids_bt, real_bt, pixel_values=arrays.get("pixel_values"),
                         image_grid_thw=arrays.get("image_grid_thw"),
                         pixel_values_videos=arrays.get("pixel_values_videos"),
                         video_grid_thw=arrays.get("video_grid_thw"), max_patches=model.max_vision_patches)
    if packed is None:
        positions = np.broadcast_to(np.arange(len(ids), dtype=np.int32), (3, len(ids))).copy()
        return Request(ids.astype(np.int32), positions, 0, sampling, max_new_tokens)
    positions, delta = get_rope_index(cfg, ids_bt, arrays.get("image_grid_thw"), arrays.get("video_grid_thw"),
                                      arrays.get("second_per_grid_ts"))
    payload = VisionPayload(np.asarray(packed.pixel_patches_np, np.float32), packed.grids_thw, packed.dest_m)
    return Request(ids.astype(np.int32), positions[:, 0].astype(np.int32), int(delta[0]), sampling,
                   max_new_tokens, payload)


def _stop_at(text: str, stop: Sequence[str]) -> int | None:
    hits = [text.find(s) for s in stop if s and s in text]
    return min(hits) if hits else None


def _tokens_through_stop(tokenizer: Any, token_ids: list[int], clean: int, stop: Sequence[str]) -> list[int]:
    """The shortest prefix of ``token_ids`` whose text holds a stop string, searched past the first ``clean``
    tokens (whose text holds none): the tokens sampled after the stop string are dropped, so a result ends with
    the token that completed it, as it ends with an end-of-sequence token."""
    for k in range(clean + 1, len(token_ids) + 1):
        if _stop_at(tokenizer.decode(token_ids[:k], skip_special_tokens=True), stop) is not None:
            return token_ids[:k]
    return token_ids


class TextStream:
    """One request's output as its token events arrive: token ids, text deltas (never splitting a multi-byte
    character, nor showing the start of a stop string before it is known not to be one) and the finish reason.
    A stop string ends the text before it; the token ids then end with the token that completed it, and the
    caller cancels the request in the engine. Without a tokenizer (token ids in, token ids out) there is no text
    and no stop string."""

    def __init__(self, tokenizer: Any | None, eos_ids: Sequence[int], stop: Sequence[str] = ()):
        self._tokenizer = tokenizer
        self._detok = StreamingDetokenizer(tokenizer) if tokenizer is not None else None
        self._eos_ids = frozenset(eos_ids)
        self._stop = [s for s in stop if s]
        # Text that could still turn out to begin a stop string waits for the tokens after it.
        self._held = max((len(s) for s in self._stop), default=1) - 1
        self._emitted = 0  # characters of text handed out as deltas
        self.text = ""  # all text so far (ending before a stop string)
        self.token_ids: list[int] = []
        self.finish_reason: str | None = None  # "stop", "length" or "cancelled" once ended
        self.steps = 0  # decode steps that produced the tokens
        self.cached_tokens = 0  # prompt tokens the prefix cache supplied

    def push(self, event: TokenEvent) -> str:
        """Takes the next event of this request; returns the text delta it completes ("" once ended)."""
        self.steps += event.steps
        self.cached_tokens = max(self.cached_tokens, event.cached_tokens)
        if self.finish_reason is not None:  # already ended by a stop string
            return ""
        clean = len(self.token_ids)
        self.token_ids += event.tokens
        if self._detok is not None:
            self.text += self._detok.push([t for t in event.tokens if t not in self._eos_ids])
            if event.finished:
                self.text += self._detok.finish()
        cut = _stop_at(self.text, self._stop) if self._stop else None
        if cut is not None:
            self.text = self.text[:cut]
            self.token_ids = _tokens_through_stop(self._tokenizer, self.token_ids, clean, self._stop)
            self.finish_reason = "stop"
        elif event.finished:
            self.finish_reason = event.finish_reason
        end = len(self.text) if self.finish_reason is not None else max(self._emitted, len(self.text) - self._held)
        delta, self._emitted = self.text[self._emitted:end], end
        return delta


def generate(model: GenerationModel, prompts: Any = None, *, images: Sequence | None = None,
             videos: Sequence | None = None, input_ids: Sequence | None = None, pixel_values: np.ndarray | None = None,
             image_grid_thw: np.ndarray | None = None, pixel_values_videos: np.ndarray | None = None,
             video_grid_thw: np.ndarray | None = None, second_per_grid_ts: np.ndarray | None = None,
             max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
             min_p: float = 0.0, repetition_penalty: float = 1.0, stop: Sequence[str] | str | None = None,
             seed: int | None = None, stream: bool = False) -> GenerationResult | list[GenerationResult] | Iterator:
    """See ``QwenVL.generate``."""
    sampling = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                              repetition_penalty=repetition_penalty, seed=seed)
    stop = [stop] if isinstance(stop, str) else list(stop or [])
    if stop:
        model.require_tokenizer("to find stop strings in the generated text")
    if stream:
        model.require_tokenizer("to stream text deltas (without stream=True, results carry the token ids)")
    arrays = dict(pixel_values=pixel_values, image_grid_thw=image_grid_thw, pixel_values_videos=pixel_values_videos,
                  video_grid_thw=video_grid_thw, second_per_grid_ts=second_per_grid_ts)
    requests, batched = build_requests(model, prompts, images=images, videos=videos, input_ids=input_ids,
                                       vision_arrays=arrays, sampling=sampling, max_new_tokens=max_new_tokens)
    events = _run(model, requests, stop, stream)
    if stream:  # prefilled when first iterated: the requests keep copies, not the pixel arrays the caller may reuse
        for request in requests:
            if request.vision is not None:
                request.vision = dataclasses.replace(request.vision, pixel_patches=request.vision.pixel_patches.copy())
        return _stream(events, batched)
    *_, results = events
    return results if batched else results[0]


def _stream(events: Iterator, batched: bool) -> Iterator[str | tuple[int, str]]:
    """Text deltas (``(request index, delta)`` for a batch); the generator's return value is the results."""
    for item in events:
        if isinstance(item, list):
            return item if batched else item[0]
        yield item if batched else item[1]


def _run(model: GenerationModel, requests: list[Request], stop: list[str], stream: bool) -> Iterator:
    """Yields (request index, text delta) as tokens arrive (none without a tokenizer), then the list of
    GenerationResults. ``stream``: the engine's short decode calls, so deltas arrive token by token rather than a
    call's worth at a time."""
    engine = model.engine()
    start = time.perf_counter()
    compiled_before = _compile_seconds[0]
    scheduler = Scheduler(engine, requests, stream)
    tokenizer = model.tokenizer
    outputs = [TextStream(tokenizer, engine.eos_ids, stop) for _ in requests]
    first_at: list[float | None] = [None] * len(requests)
    done_at = [0.0] * len(requests)
    for ev in scheduler.events():
        i, out = ev.request_index, outputs[ev.request_index]
        ended = out.finish_reason is not None
        delta = out.push(ev)
        now = time.perf_counter()
        if first_at[i] is None and ev.tokens:
            first_at[i] = now
        if out.finish_reason is not None and not ended:
            done_at[i] = now
            if not ev.finished:  # a stop string
                scheduler.cancel(i)
        if delta:
            yield i, delta
    results = []
    for i, (req, out) in enumerate(zip(requests, outputs)):
        ttft = (first_at[i] or start) - start
        decode_s = done_at[i] - (first_at[i] or done_at[i])
        reason = out.finish_reason or "length"
        ids = out.token_ids
        truncated = reason == "length" and len(ids) < req.max_new_tokens
        if truncated:
            warnings.warn(f"request {i} stopped at the engine's max_len of {engine.config.max_len} tokens: its "
                          f"{len(req.input_ids)} prompt tokens left room for {len(ids)} of max_new_tokens="
                          f"{req.max_new_tokens} (raise it with configure(max_len=...) or --max-len)", stacklevel=2)
        k = engine.speculative_tokens
        per_step = (len(ids) - 1) / out.steps if k and out.steps else None
        stats = GenerationStats(
            prompt_tokens=len(req.input_ids), new_tokens=len(ids), ttft_s=ttft,
            prefill_tok_s=len(req.input_ids) / ttft if ttft > 0 else float("inf"),
            decode_tok_s=(len(ids) - 1) / decode_s if decode_s > 0 else 0.0,
            compile_s=_compile_seconds[0] - compiled_before, total_s=time.perf_counter() - start,
            truncated_by_max_len=truncated, tokens_per_step=per_step,
            draft_acceptance=None if per_step is None else (per_step - 1) / k, cached_tokens=out.cached_tokens)
        results.append(GenerationResult(out.text if tokenizer is not None else None, ids, reason, stats))
    yield results
