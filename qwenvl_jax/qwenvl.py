"""The public model handle: ``qwenvl_jax.load(path)`` returns a ``QwenVL``."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from convert.converter import load_params
from convert.safetensors_io import checkpoint_dir
from qwenvl_jax.config import ModelConfig
from qwenvl_jax.engine import Engine, EngineConfig
from qwenvl_jax.generate import GenerationResult, generate
from qwenvl_jax.models.model import QwenVLModel, multimodal_logits_fn, text_logits_fn
from qwenvl_jax.models.multimodal import prepare_multimodal
from qwenvl_jax.models.rope_index import get_rope_index
from qwenvl_jax.sharding import make_mesh, mesh_context, mesh_of

if TYPE_CHECKING:
    from qwenvl_jax.processing import Processor

# Per image or video. The hub processors' limits reach 65536 (Qwen2.5-VL: max_pixels 12845056 at 14 px) and 49152
# (Qwen3-VL video: 25165824 px over all frames at 16 px, 2 frames a patch).
DEFAULT_MAX_VISION_PATCHES = 65536
_NOT_LOADED = object()  # the tokenizer slot before the first look (None: the checkpoint has none)


def _right_align(mask_bt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-row (start, length) of a contiguous attention mask; the model runs rows shifted to start at 0."""
    if mask_bt.ndim != 2 or not np.isin(mask_bt, (0, 1)).all():
        raise ValueError("attention_mask must be a [B, T] array of 0/1")
    lengths = mask_bt.sum(axis=1).astype(np.int32)
    starts = np.argmax(mask_bt, axis=1).astype(np.int32)
    for row, (s, n) in enumerate(zip(starts, lengths)):
        if n == 0:
            raise ValueError(f"attention_mask row {row} has no real tokens")
        if not mask_bt[row, s : s + n].all():
            raise ValueError(f"attention_mask row {row} is not contiguous (only left or right padding is supported)")
    return starts, lengths


def _shift_rows(x_bt: np.ndarray, shifts_b: np.ndarray) -> np.ndarray:
    """Rolls each row left by its shift (axis 1), trailing axes carried along."""
    t = x_bt.shape[1]
    idx = (np.arange(t)[None, :] + shifts_b[:, None]) % t
    return np.take_along_axis(x_bt, idx.reshape(idx.shape + (1,) * (x_bt.ndim - 2)), axis=1)


class QwenVL:
    """A loaded model: config, parameters on the device, and the entry points."""

    def __init__(self, cfg: ModelConfig, model: QwenVLModel, path: Path):
        self.config = cfg
        self.graphdef, self.params = nnx.split(model)
        self.path = path
        self.max_vision_patches = DEFAULT_MAX_VISION_PATCHES
        self._engine: Engine | None = None
        # The options given to configure(), not the resulting config: defaults derived from other fields (the
        # prompt buckets from max_len) are derived again at every configure().
        self._engine_options: dict[str, Any] = {}
        self._engine_config = EngineConfig()
        self._processor: Processor | None = None
        self._tokenizer: Any = _NOT_LOADED

    # ---- host-side assets, loaded on first use (transformers, and torch where installed, take seconds to import;
    # token ids with HF-named arrays need neither)
    @property
    def processor(self) -> Processor:
        """Chat messages / prompts + images + videos -> HF-named numpy arrays (``input_ids``, ``attention_mask``,
        ``pixel_values``, ``image_grid_thw``, ...), as the checkpoint's HF processor makes them. Needs the
        checkpoint's tokenizer and processor files (a MissingFilesError names those it lacks)."""
        if self._processor is None:
            from qwenvl_jax.processing import Processor

            self._processor = Processor.from_pretrained(self.path, max_image_patches=self.max_vision_patches,
                                                        tokenizer=self.tokenizer)
        return self._processor

    @property
    def tokenizer(self) -> Any | None:
        """The checkpoint's tokenizer, or None when the directory has no tokenizer files."""
        if self._tokenizer is _NOT_LOADED:
            from qwenvl_jax.processing import load_tokenizer, missing_tokenizer_files

            self._tokenizer = None if missing_tokenizer_files(self.path) else load_tokenizer(self.path)
        return self._tokenizer

    def require_tokenizer(self, needed_for: str) -> Any:
        """The tokenizer, or a MissingFilesError naming the files it lacks and ``needed_for`` (what needs them)."""
        if self.tokenizer is None:
            from qwenvl_jax.processing import MissingFilesError, missing_tokenizer_files

            raise MissingFilesError(self.path, missing_tokenizer_files(self.path), needed_for)
        return self.tokenizer

    def eos_token_ids(self) -> tuple[int, ...]:
        """generation_config.json's eos ids, else config.json's (top level, then text_config), else the
        tokenizer's; the tokenizer is not loaded when a config names them."""
        for name in ("generation_config.json", "config.json"):
            f = self.path / name
            if f.is_file():
                raw = json.loads(f.read_text())
                eos = raw.get("eos_token_id")
                if eos is None:
                    eos = (raw.get("text_config") or {}).get("eos_token_id")
                if eos is not None:
                    return tuple(eos) if isinstance(eos, list) else (eos,)
        tokenizer = self.tokenizer
        return () if tokenizer is None or tokenizer.eos_token_id is None else (tokenizer.eos_token_id,)

    # ---- generation
    def configure(self, **engine_options: Any) -> None:
        """Engine settings (``EngineConfig`` fields: max_batch, max_len, prompt_buckets, decode_steps, ...), merged
        into those of earlier calls; checked now, in effect at the next ``generate`` / ``warmup`` (which
        recompiles)."""
        options = {**self._engine_options, **engine_options}
        self._engine_config = EngineConfig(**options)
        self._engine_options = options
        self._engine = None

    def engine(self) -> Engine:
        if self._engine is None:
            self._engine = Engine(self.graphdef, self.params,
                                  self._engine_config, eos_ids=self.eos_token_ids())
        return self._engine

    def prefix_cache_stats(self) -> dict[str, int] | None:
        """The prefix cache's counters (lookups, hits, hit tokens, pages and snapshots saved, evicted and in use,
        bytes), None when it is off (``configure(prefix_cache=False)``)."""
        prefix = self.engine().prefix
        return None if prefix is None else prefix.stats()

    def clear_prefix_cache(self) -> None:
        """Forgets every cached prefix: the next requests prefill from scratch."""
        if self._engine is not None and self._engine.prefix is not None:
            self._engine.prefix.clear()

    def warmup(self, progress: bool = True) -> float:
        """Compiles every prefill/decode bucket now (the first generate does it otherwise); returns seconds."""
        return self.engine().warmup(progress=progress)

    def generate(self, prompts: Any = None, **kwargs: Any
                 ) -> GenerationResult | list[GenerationResult] | Iterator[str | tuple[int, str]]:
        """Generates from a prompt string, a chat conversation (OpenAI/HF-style messages with text, image and
        video content parts), a list of either (a batch), or ``input_ids=`` with HF-named vision arrays.

        Keyword arguments: images, videos (with a single prompt), input_ids, pixel_values, image_grid_thw,
        pixel_values_videos, video_grid_thw, second_per_grid_ts, max_new_tokens=128, temperature=0 (greedy),
        top_p, top_k, min_p, repetition_penalty, stop (strings), seed, stream. Returns a ``GenerationResult``
        (text, token_ids, finish_reason, stats) or a list for a batch; ``stream=True`` yields text deltas
        (``(index, delta)`` pairs for a batch) and returns the results. Token ids with HF-named arrays need no
        tokenizer or processor files; without a tokenizer ``text`` is None, and stop strings and streaming,
        which need one, raise an error naming the missing files.
        """
        return generate(self, prompts, **kwargs)

    @property
    def dtype(self) -> jnp.dtype:
        return self.params["language_model"]["embed_tokens"]["weight"].get_value().dtype

    def logits(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray | None = None,
        *,
        pixel_values: np.ndarray | None = None,
        image_grid_thw: np.ndarray | None = None,
        pixel_values_videos: np.ndarray | None = None,
        video_grid_thw: np.ndarray | None = None,
        second_per_grid_ts: np.ndarray | None = None,
    ) -> np.ndarray:
        """Full-sequence logits [B, T, vocab] (float32); rows may be left- or right-padded.

        Images and videos come as the HF processor returns them (numpy, HF's names and layouts); the prompt holds
        one placeholder token per merged vision token. Padded positions are returned as zeros.
        """
        ids_bt = np.asarray(input_ids)
        if ids_bt.ndim != 2 or not np.issubdtype(ids_bt.dtype, np.integer):
            raise ValueError(f"input_ids must be a [B, T] integer array, got {ids_bt.dtype} {ids_bt.shape}")
        vocab = self.config.text.vocab_size
        mask_bt = np.ones_like(ids_bt) if attention_mask is None else np.asarray(attention_mask)
        if mask_bt.shape != ids_bt.shape:
            raise ValueError(f"attention_mask shape {mask_bt.shape} != input_ids shape {ids_bt.shape}")
        starts, lengths = _right_align(mask_bt)
        shifted_bt = _shift_rows(ids_bt, starts)
        real_bt = np.arange(ids_bt.shape[1])[None, :] < lengths[:, None]
        if (bad := shifted_bt[real_bt]).size and (bad.min() < 0 or bad.max() >= vocab):
            raise ValueError(f"input_ids hold ids outside the vocabulary [0, {vocab})")
        shifted_bt = np.where(real_bt, shifted_bt, 0).astype(np.int32)

        mm = prepare_multimodal(self.config, shifted_bt, real_bt, pixel_values=pixel_values,
                                image_grid_thw=image_grid_thw, pixel_values_videos=pixel_values_videos,
                                video_grid_thw=video_grid_thw, max_patches=self.max_vision_patches)
        if mm is None:  # text only: the vision tower is neither traced nor run
            # Text-only mRoPE: all three rows are the running position (HF's get_rope_index without vision).
            positions_3bt = np.broadcast_to(np.arange(ids_bt.shape[1], dtype=np.int32), (3, *ids_bt.shape))
            with mesh_context(mesh_of(self.params)):
                logits = text_logits_fn(self.graphdef, self.params, shifted_bt, positions_3bt, lengths)
        else:
            positions_3bt, _ = get_rope_index(self.config, ids_bt, image_grid_thw, video_grid_thw,
                                              second_per_grid_ts, mask_bt)
            positions_3bt = np.moveaxis(_shift_rows(np.moveaxis(positions_3bt, 0, -1), starts), -1, 0)
            with mesh_context(mesh_of(self.params)):
                logits = multimodal_logits_fn(self.graphdef, self.params, shifted_bt, positions_3bt.astype(np.int32),
                                              lengths, mm)
        logits = np.where(real_bt[..., None], np.asarray(logits), 0.0)
        return _shift_rows(logits, -starts)


def load(path: str | Path, dtype: str | None = None, *, tensor_parallel: int = 1, expert_parallel: int = 1
         ) -> QwenVL:
    """Loads a converted checkpoint directory, or an HF checkpoint directory (converted in memory); relative paths
    and ``~`` work. ``dtype`` (bfloat16, float16, float32): the compute dtype; default the converted one, or
    bfloat16 for an HF directory. ``tensor_parallel`` x ``expert_parallel`` devices (``qwenvl_jax.sharding``):
    attention heads, MLP columns and the vocabulary split over the first, MoE experts over the second; a converted
    checkpoint is restored straight onto that mesh, each device reading its own slices."""
    path = checkpoint_dir(path)
    mesh = make_mesh(tensor_parallel, expert_parallel) if tensor_parallel * expert_parallel > 1 else None
    cfg, model = load_params(path, dtype, mesh)
    return QwenVL(cfg, model, path)
