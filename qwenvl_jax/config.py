"""Typed, frozen configs parsed from a HuggingFace ``config.json``.

One parser serves every family: the families differ by a handful of switches (qkv bias, q/k norm, output gate,
interleaved mRoPE, zero-centred norms, DeepStack, window attention), which are derived here once so the model code
reads flags instead of family names.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Literal

Family = Literal["qwen2_5_vl", "qwen3_vl", "qwen3_5"]
LayerType = Literal["full_attention", "linear_attention"]
MlpType = Literal["dense", "moe"]

# model_type -> (family, is_moe, has_vision)
MODEL_TYPES: dict[str, tuple[Family, bool, bool]] = {
    "qwen2_5_vl": ("qwen2_5_vl", False, True),
    "qwen2_5_vl_text": ("qwen2_5_vl", False, False),
    "qwen3_vl": ("qwen3_vl", False, True),
    "qwen3_vl_text": ("qwen3_vl", False, False),
    "qwen3_vl_moe": ("qwen3_vl", True, True),
    "qwen3_vl_moe_text": ("qwen3_vl", True, False),
    "qwen3_5": ("qwen3_5", False, True),
    "qwen3_5_text": ("qwen3_5", False, False),
    "qwen3_5_moe": ("qwen3_5", True, True),
    "qwen3_5_moe_text": ("qwen3_5", True, False),
}


@dataclasses.dataclass(frozen=True)
class TextConfig:
    family: Family
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float
    mrope_section: tuple[int, int, int]
    mrope_interleaved: bool
    partial_rotary_factor: float
    qkv_bias: bool  # bias on q/k/v projections
    o_bias: bool  # bias on the output projection
    qk_norm: bool  # per-head RMSNorm on q and k (Qwen3-VL, Qwen3.5)
    attn_output_gate: bool  # sigmoid output gate folded into q_proj (Qwen3.5)
    norm_zero_centered: bool  # RMSNorm scales by (1 + weight) (Qwen3.5)
    layer_types: tuple[LayerType, ...]
    mlp_types: tuple[MlpType, ...]
    tie_word_embeddings: bool
    max_position_embeddings: int
    # MoE (zero when dense)
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    # Gated DeltaNet (zero when the model has none)
    linear_conv_kernel_dim: int = 0
    linear_key_head_dim: int = 0
    linear_value_head_dim: int = 0
    linear_num_key_heads: int = 0
    linear_num_value_heads: int = 0
    # Multi-token-prediction layers the model carries (Qwen3.5's ``mtp.*`` head): set by the converter from the
    # checkpoint's weights, 0 when it has none. ``config.json`` alone does not say whether the weights exist.
    mtp_layers: int = 0
    # Gated DeltaNet's q|k|v channels (in_proj_qkv's output columns, conv1d's, the conv state's) in this many
    # blocks of [q_i | k_i | v_i]: the tensor-parallel size when that axis splits the key and value heads
    # (``qwenvl_jax.sharding``), so that each device's contiguous slice holds whole heads of all three. 1 is HF's
    # [q | k | v].
    gdn_head_blocks: int = 1

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def gdn_key_dim(self) -> int:
        return self.linear_key_head_dim * self.linear_num_key_heads

    @property
    def gdn_value_dim(self) -> int:
        return self.linear_value_head_dim * self.linear_num_value_heads

    @property
    def gdn_conv_dim(self) -> int:
        return 2 * self.gdn_key_dim + self.gdn_value_dim


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    family: Family
    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    in_channels: int
    patch_size: int
    temporal_patch_size: int
    spatial_merge_size: int
    out_hidden_size: int
    hidden_act: str
    # Qwen2.5-VL: window attention everywhere except these blocks
    window_size: int = 0
    fullatt_block_indexes: tuple[int, ...] = ()
    tokens_per_second: float = 0.0
    # Qwen3-VL / Qwen3.5: learned position embedding grid and DeepStack taps
    num_position_embeddings: int = 0
    deepstack_visual_indexes: tuple[int, ...] = ()

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size


@dataclasses.dataclass(frozen=True)
class Fp8Config:
    """Fine-grained FP8 weights (HF ``"quant_method": "fp8"``): float8_e4m3fn weights, one fp32 scale per
    ``block`` = (output rows, input columns) block, activations quantized at run time. ``modules`` are the
    Linear layers that are FP8 (our dotted module paths; the checkpoint's scale tensors say which), the others
    stay in the compute dtype. ``modules_to_not_convert``: HF's list, kept for quantizing a bf16 checkpoint."""

    block: tuple[int, int] = (128, 128)
    modules: tuple[str, ...] = ()
    modules_to_not_convert: tuple[str, ...] = ()


# Quantization methods of HF configs that are not fine-grained FP8, named in the refusal.
_QUANT_METHODS_REFUSED = ("awq", "gptq", "compressed-tensors", "bitsandbytes", "aqlm", "exl2", "hqq", "eetq",
                          "fbgemm_fp8", "torchao", "quanto", "bitnet", "higgs", "vptq", "spqr", "mxfp4")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    model_type: str
    text: TextConfig
    vision: VisionConfig | None
    image_token_id: int | None = None
    video_token_id: int | None = None
    vision_start_token_id: int | None = None
    vision_end_token_id: int | None = None
    fp8: Fp8Config | None = None  # None: every weight in the compute dtype

    @property
    def family(self) -> Family:
        return self.text.family

    @property
    def is_moe(self) -> bool:
        return self.text.num_experts > 0

    def with_mtp_layers(self, layers: int) -> ModelConfig:
        return dataclasses.replace(self, text=dataclasses.replace(self.text, mtp_layers=layers))

    def with_gdn_head_blocks(self, blocks: int) -> ModelConfig:
        return dataclasses.replace(self, text=dataclasses.replace(self.text, gdn_head_blocks=blocks))

    def with_fp8_modules(self, modules: tuple[str, ...]) -> ModelConfig:
        """The FP8 config with the modules a checkpoint quantizes (None when it quantizes none)."""
        if not modules:
            return dataclasses.replace(self, fp8=None)
        return dataclasses.replace(self, fp8=dataclasses.replace(self.fp8 or Fp8Config(), modules=tuple(modules)))


def load_config(path: str | Path) -> ModelConfig:
    """Reads ``config.json`` from a checkpoint directory (or the file itself)."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ValueError(f"no config.json at {path}")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    return parse_config(raw)


def parse_config(raw: dict[str, Any]) -> ModelConfig:
    model_type = raw.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ValueError(
            f"unsupported model_type {model_type!r}; supported: {', '.join(sorted(MODEL_TYPES))}"
        )
    family, is_moe, has_vision = MODEL_TYPES[model_type]
    # Hub Qwen2.5-VL configs are flat: text fields at the top level.
    nested = isinstance(raw.get("text_config"), dict)
    text_raw = raw["text_config"] if nested else raw
    text = _parse_text(text_raw, family, is_moe, tie_default=raw.get("tie_word_embeddings"),
                       where="text_config." if nested else "")
    vision = None
    if has_vision:
        if "vision_config" not in raw:
            raise ValueError(f"config field 'vision_config' is missing (required for {model_type})")
        vision = _parse_vision(raw["vision_config"], family)
        if vision.out_hidden_size != text.hidden_size:
            raise ValueError(
                f"vision_config.out_hidden_size ({vision.out_hidden_size}) != text hidden_size ({text.hidden_size})"
            )
    return ModelConfig(
        model_type=model_type,
        text=text,
        vision=vision,
        image_token_id=raw.get("image_token_id"),
        video_token_id=raw.get("video_token_id"),
        vision_start_token_id=raw.get("vision_start_token_id"),
        vision_end_token_id=raw.get("vision_end_token_id"),
        fp8=_parse_quantization(raw.get("quantization_config")),
    )


def _parse_quantization(raw: dict[str, Any] | None) -> Fp8Config | None:
    """HF's ``quantization_config``: fine-grained FP8 is read; any other method is refused by name."""
    if raw is None:
        return None
    w = "quantization_config."
    method = raw.get("quant_method")
    if method != "fp8":
        known = " (a method qwenvl-jax does not run)" if method in _QUANT_METHODS_REFUSED else ""
        raise ValueError(f"config field '{w}quant_method' is {method!r}{known}: qwenvl-jax reads unquantized "
                         "checkpoints and fine-grained FP8 ('fp8', float8_e4m3fn weights with 128x128 block scales)")
    if (fmt := raw.get("fmt", "e4m3")) != "e4m3":
        raise ValueError(f"config field '{w}fmt' is {fmt!r}; only 'e4m3' (float8_e4m3fn) FP8 weights are supported")
    if (scheme := raw.get("activation_scheme", "dynamic")) != "dynamic":
        raise ValueError(f"config field '{w}activation_scheme' is {scheme!r}; only 'dynamic' (activations "
                         "quantized at run time) is supported")
    block = raw.get("weight_block_size")
    if block is None:
        raise ValueError(f"config field '{w}weight_block_size' is missing: per-tensor FP8 scales are not supported, "
                         "only block scales such as [128, 128]")
    if not (isinstance(block, (list, tuple)) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise ValueError(f"config field '{w}weight_block_size' must be two positive integers, got {block!r}")
    skip = raw.get("modules_to_not_convert") or raw.get("ignored_layers") or ()
    return Fp8Config(block=(block[0], block[1]), modules_to_not_convert=tuple(skip))


def _require(raw: dict[str, Any], key: str, where: str, *aliases: str) -> Any:
    for k in (key, *aliases):
        if raw.get(k) is not None:
            return raw[k]
    raise ValueError(f"config field '{where}{key}' is missing")


def _positive(value: Any, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"config field '{name}' must be a positive integer, got {value!r}")
    return value


def _parse_text(raw: dict[str, Any], family: Family, is_moe: bool, tie_default: bool | None,
                where: str) -> TextConfig:
    w = where
    req = lambda key, *aliases: _require(raw, key, w, *aliases)  # noqa: E731
    hidden = _positive(req("hidden_size"), w + "hidden_size")
    n_layers = _positive(req("num_hidden_layers"), w + "num_hidden_layers")
    n_heads = _positive(req("num_attention_heads"), w + "num_attention_heads")
    n_kv = _positive(raw.get("num_key_value_heads") or n_heads, w + "num_key_value_heads")
    if n_heads % n_kv:
        raise ValueError(f"config field '{w}num_attention_heads' ({n_heads}) is not a multiple of "
                         f"num_key_value_heads ({n_kv})")
    # Qwen2.5-VL's attention ignores head_dim and always splits hidden_size.
    head_dim = hidden // n_heads if family == "qwen2_5_vl" else _positive(raw.get("head_dim") or hidden // n_heads,
                                                                           w + "head_dim")
    if (act := raw.get("hidden_act", "silu")) != "silu":
        raise ValueError(f"config field '{w}hidden_act' must be 'silu', got {act!r}")

    rope = {**(raw.get("rope_scaling") or {}), **(raw.get("rope_parameters") or {})}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "mrope"):
        raise ValueError(f"config field '{w}rope_parameters.rope_type' {rope_type!r} is not supported "
                         "(only default mRoPE)")
    rope_theta = rope.get("rope_theta", raw.get("rope_theta"))
    if rope_theta is None:
        raise ValueError(f"config field '{w}rope_parameters.rope_theta' is missing")
    partial = float(rope.get("partial_rotary_factor", raw.get("partial_rotary_factor",
                                                               0.25 if family == "qwen3_5" else 1.0)))
    default_section = {"qwen3_5": [11, 11, 10], "qwen3_vl": [24, 20, 20], "qwen2_5_vl": [16, 24, 24]}[family]
    section = tuple(int(s) for s in rope.get("mrope_section", default_section))  # HF's per-family defaults
    rotary_half = int(head_dim * partial) // 2
    if len(section) != 3 or sum(section) != rotary_half:
        raise ValueError(
            f"config field '{w}rope_parameters.mrope_section' {list(section)} must have 3 entries summing to the "
            f"rotary half-dim {rotary_half} (head_dim {head_dim} x partial_rotary_factor {partial} / 2)"
        )
    interleaved = bool(rope.get("mrope_interleaved", family != "qwen2_5_vl"))

    if family == "qwen3_5":
        layer_types = raw.get("layer_types")
        if layer_types is None:
            interval = raw.get("full_attention_interval", 4)
            layer_types = ["linear_attention" if (i + 1) % interval else "full_attention" for i in range(n_layers)]
    else:
        layer_types = ["full_attention"] * n_layers
    layer_types = tuple(layer_types)
    if len(layer_types) != n_layers:
        raise ValueError(f"config field '{w}layer_types' has {len(layer_types)} entries for "
                         f"num_hidden_layers={n_layers}")
    unknown = sorted(set(layer_types) - {"full_attention", "linear_attention"})
    if unknown:
        raise ValueError(f"config field '{w}layer_types' has unsupported entries {unknown}")

    moe: dict[str, int] = {}
    if is_moe:
        moe = dict(
            num_experts=_positive(req("num_experts", "num_local_experts"), w + "num_experts"),
            num_experts_per_tok=_positive(req("num_experts_per_tok"), w + "num_experts_per_tok"),
            moe_intermediate_size=_positive(req("moe_intermediate_size"), w + "moe_intermediate_size"),
        )
        if moe["num_experts_per_tok"] > moe["num_experts"]:
            raise ValueError(f"config field '{w}num_experts_per_tok' ({moe['num_experts_per_tok']}) exceeds "
                             f"num_experts ({moe['num_experts']})")
        if family == "qwen3_5":
            moe["shared_expert_intermediate_size"] = _positive(
                req("shared_expert_intermediate_size"), w + "shared_expert_intermediate_size")
        sparse_step = raw.get("decoder_sparse_step", 1)
        dense_only = set(raw.get("mlp_only_layers") or [])
        mlp_types = tuple("moe" if i not in dense_only and (i + 1) % sparse_step == 0 else "dense"
                          for i in range(n_layers))
    else:
        mlp_types = ("dense",) * n_layers
    needs_dense = "dense" in mlp_types
    intermediate = _positive(req("intermediate_size"), w + "intermediate_size") if needs_dense else raw.get(
        "intermediate_size", 0) or 0

    gdn: dict[str, int] = {}
    if "linear_attention" in layer_types:
        gdn = {k: _positive(req(k), w + k) for k in (
            "linear_conv_kernel_dim", "linear_key_head_dim", "linear_value_head_dim",
            "linear_num_key_heads", "linear_num_value_heads")}
        if gdn["linear_num_value_heads"] % gdn["linear_num_key_heads"]:
            raise ValueError(f"config field '{w}linear_num_value_heads' ({gdn['linear_num_value_heads']}) is not a "
                             f"multiple of linear_num_key_heads ({gdn['linear_num_key_heads']})")

    tie = raw.get("tie_word_embeddings", False) if tie_default is None else tie_default
    return TextConfig(
        family=family,
        vocab_size=_positive(req("vocab_size"), w + "vocab_size"),
        hidden_size=hidden,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv,
        head_dim=head_dim,
        intermediate_size=intermediate,
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        rope_theta=float(rope_theta),
        mrope_section=section,  # type: ignore[arg-type]
        mrope_interleaved=interleaved,
        partial_rotary_factor=partial,
        qkv_bias=True if family == "qwen2_5_vl" else bool(raw.get("attention_bias", False)),
        o_bias=False if family == "qwen2_5_vl" else bool(raw.get("attention_bias", False)),
        qk_norm=family != "qwen2_5_vl",
        attn_output_gate=family == "qwen3_5",
        norm_zero_centered=family == "qwen3_5",
        layer_types=layer_types,  # type: ignore[arg-type]
        mlp_types=mlp_types,  # type: ignore[arg-type]
        tie_word_embeddings=bool(tie),
        max_position_embeddings=int(raw.get("max_position_embeddings", 32768)),
        **moe,
        **gdn,
    )


def _as_int(value: Any, name: str) -> int:
    if isinstance(value, (list, tuple)):  # HF allows [p, p]; only square patches exist in these families
        if len(set(value)) != 1:
            raise ValueError(f"config field '{name}' must be square, got {value!r}")
        value = value[0]
    return _positive(value, name)


def _parse_vision(raw: dict[str, Any], family: Family) -> VisionConfig:
    w = "vision_config."
    req = lambda key, *aliases: _require(raw, key, w, *aliases)  # noqa: E731
    hidden = _positive(req("hidden_size"), w + "hidden_size")
    heads = _positive(req("num_heads", "num_attention_heads"), w + "num_heads")
    if hidden % heads:
        raise ValueError(f"config field '{w}hidden_size' ({hidden}) is not a multiple of num_heads ({heads})")
    depth = _positive(req("depth", "num_hidden_layers"), w + "depth")
    extra: dict[str, Any] = {}
    if family == "qwen2_5_vl":
        full = tuple(int(i) for i in raw.get("fullatt_block_indexes", ()))
        if any(not 0 <= i < depth for i in full):
            raise ValueError(f"config field '{w}fullatt_block_indexes' {list(full)} out of range for depth {depth}")
        extra = dict(window_size=_positive(req("window_size"), w + "window_size"), fullatt_block_indexes=full,
                     tokens_per_second=float(raw.get("tokens_per_second", 2)))
    else:
        taps = tuple(int(i) for i in raw.get("deepstack_visual_indexes", ()))
        if any(not 0 <= i < depth for i in taps):
            raise ValueError(f"config field '{w}deepstack_visual_indexes' {list(taps)} out of range for depth {depth}")
        n_pos = _positive(req("num_position_embeddings"), w + "num_position_embeddings")
        if int(n_pos**0.5) ** 2 != n_pos:
            raise ValueError(f"config field '{w}num_position_embeddings' ({n_pos}) must be a perfect square")
        extra = dict(num_position_embeddings=n_pos, deepstack_visual_indexes=taps)
    return VisionConfig(
        family=family,
        depth=depth,
        hidden_size=hidden,
        intermediate_size=_positive(req("intermediate_size"), w + "intermediate_size"),
        num_heads=heads,
        in_channels=_positive(raw.get("in_channels", raw.get("in_chans", 3)), w + "in_channels"),
        patch_size=_as_int(req("patch_size"), w + "patch_size"),
        temporal_patch_size=_as_int(req("temporal_patch_size"), w + "temporal_patch_size"),
        spatial_merge_size=_positive(req("spatial_merge_size"), w + "spatial_merge_size"),
        out_hidden_size=_positive(req("out_hidden_size"), w + "out_hidden_size"),
        hidden_act=str(raw.get("hidden_act", "silu" if family == "qwen2_5_vl" else "gelu_pytorch_tanh")),
        **extra,
    )
