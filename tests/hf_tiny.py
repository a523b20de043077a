"""Tiny random HF models of every family, built with transformers + torch on the CPU (the test reference).

Two variants per family differ where real checkpoints differ: tied vs untied embeddings, GQA ratio, value/key
head ratio, partial rotary factor, MoE top-k and expert count, dense layers among MoE ones, and a layer pattern
that does not divide the depth.
"""

from __future__ import annotations

import json
from pathlib import Path

from qwenvl_jax import tiny_checkpoint_assets
from qwenvl_jax.config import load_config
from qwenvl_jax.tiny_model import HF_CONFIG_CLASSES

VISION_QWEN2_5 = dict(depth=2, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64,
                      patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                      fullatt_block_indexes=[1])
VISION_QWEN3 = dict(depth=2, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64, patch_size=16,
                    spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64)


def _rope(section: list[int], interleaved: bool, partial: float = 1.0) -> dict:
    rope = dict(rope_type="default", rope_theta=10000.0, mrope_section=section)
    if interleaved:
        rope["mrope_interleaved"] = True
    if partial != 1.0:
        rope["partial_rotary_factor"] = partial
    return rope


BASE_TEXT = dict(hidden_size=64, intermediate_size=96, vocab_size=512, rms_norm_eps=1e-6)

VARIANTS: dict[str, tuple[str, dict, dict, bool]] = {
    # name: (model_type, text_config, vision_config, tie_word_embeddings)
    "qwen2_5_vl-a": ("qwen2_5_vl", dict(BASE_TEXT, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                        rope_parameters=_rope([2, 3, 3], False)), VISION_QWEN2_5, False),
    "qwen2_5_vl-b": ("qwen2_5_vl", dict(BASE_TEXT, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1,
                                        rope_parameters=_rope([4, 2, 2], False)), VISION_QWEN2_5, True),
    "qwen3_vl-a": ("qwen3_vl", dict(BASE_TEXT, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                    head_dim=16, rope_parameters=_rope([2, 3, 3], True)),
                   dict(VISION_QWEN3, deepstack_visual_indexes=[0]), False),
    "qwen3_vl-b": ("qwen3_vl", dict(BASE_TEXT, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1,
                                    head_dim=32, rope_parameters=_rope([8, 4, 4], True)),
                   dict(VISION_QWEN3, deepstack_visual_indexes=[0, 1]), True),
    "qwen3_vl_moe-a": ("qwen3_vl_moe", dict(BASE_TEXT, num_hidden_layers=2, num_attention_heads=4,
                                            num_key_value_heads=2, head_dim=16, num_experts=4, num_experts_per_tok=2,
                                            moe_intermediate_size=32, rope_parameters=_rope([2, 3, 3], True)),
                       dict(VISION_QWEN3, deepstack_visual_indexes=[0]), False),
    "qwen3_vl_moe-b": ("qwen3_vl_moe", dict(BASE_TEXT, num_hidden_layers=3, num_attention_heads=4,
                                            num_key_value_heads=1, head_dim=16, num_experts=8, num_experts_per_tok=3,
                                            moe_intermediate_size=24, mlp_only_layers=[0],
                                            rope_parameters=_rope([2, 3, 3], True)),
                       dict(VISION_QWEN3, deepstack_visual_indexes=[1]), True),
    # Two of each mixer in four layers (the layer pattern from full_attention_interval): the fewest layers that
    # still alternate; every test program's compile time grows with depth.
    "qwen3_5-a": ("qwen3_5", dict(BASE_TEXT, num_hidden_layers=4, full_attention_interval=2, num_attention_heads=4,
                                  num_key_value_heads=2, head_dim=32, linear_num_key_heads=2, linear_num_value_heads=4,
                                  linear_key_head_dim=16, linear_value_head_dim=16, linear_conv_kernel_dim=4,
                                  rope_parameters=_rope([2, 1, 1], True, 0.25)), VISION_QWEN3, False),
    "qwen3_5-b": ("qwen3_5", dict(BASE_TEXT, num_hidden_layers=6, num_attention_heads=2, num_key_value_heads=2,
                                  head_dim=16, linear_num_key_heads=2, linear_num_value_heads=2,
                                  linear_key_head_dim=8, linear_value_head_dim=16, linear_conv_kernel_dim=3,
                                  layer_types=["linear_attention"] * 3 + ["full_attention"] + ["linear_attention"] * 2,
                                  rope_parameters=_rope([2, 1, 1], True, 0.5)), VISION_QWEN3, True),
    "qwen3_5_moe-a": ("qwen3_5_moe", dict(BASE_TEXT, num_hidden_layers=4, num_attention_heads=4,
                                          num_key_value_heads=2, head_dim=32, linear_num_key_heads=2,
                                          linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16,
                                          num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                          shared_expert_intermediate_size=48,
                                          rope_parameters=_rope([2, 1, 1], True, 0.25)), VISION_QWEN3, False),
    "qwen3_5_moe-b": ("qwen3_5_moe", dict(BASE_TEXT, num_hidden_layers=5, num_attention_heads=2,
                                          num_key_value_heads=1, head_dim=32, linear_num_key_heads=1,
                                          linear_num_value_heads=3, linear_key_head_dim=16, linear_value_head_dim=8,
                                          num_experts=6, num_experts_per_tok=3, moe_intermediate_size=16,
                                          shared_expert_intermediate_size=24,
                                          rope_parameters=_rope([2, 1, 1], True, 0.25)), VISION_QWEN3, True),
}

def hf_config(variant: str, text_overrides: dict | None = None):
    import transformers

    model_type, text, vision, tie = VARIANTS[variant]
    cls = getattr(transformers, HF_CONFIG_CLASSES[model_type])
    return cls(text_config=dict(text, **(text_overrides or {})), vision_config=dict(vision), tie_word_embeddings=tie)


def build_hf_model(variant: str, out_dir: Path, seed: int = 0, max_shard_size: str = "100KB",
                   text_overrides: dict | None = None):
    """Saves a random fp32 HF model of ``variant`` (its text config updated by ``text_overrides``) to ``out_dir``
    (index-sharded) and returns it (eval mode)."""
    import torch
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(hf_config(variant, text_overrides), dtype=torch.float32).eval()
    with torch.no_grad():  # HF inits norms and biases to constants; randomise them so a misplaced one shows
        for p in model.parameters():
            if p.numel() == 1 or p.std() == 0:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(out_dir, max_shard_size=max_shard_size)
    return model


def build_hf_checkpoint(variant: str, out_dir: Path, vocab_size: int = 512):
    """``build_hf_model`` plus tokenizer, chat template and processor files, with the vision token ids moved into
    the vocabulary (HF's tiny defaults point past it) in config.json and in the returned HF model's config."""
    hf = build_hf_model(variant, out_dir)
    cfg = json.loads((out_dir / "config.json").read_text())
    ids = tiny_checkpoint_assets.save(out_dir, load_config(out_dir).family, vocab_size=vocab_size,
                                      patch_size=cfg["vision_config"]["patch_size"])
    tokens = {"image_token_id": ids["<|image_pad|>"], "video_token_id": ids["<|video_pad|>"],
              "vision_start_token_id": ids["<|vision_start|>"], "vision_end_token_id": ids["<|vision_end|>"]}
    (out_dir / "config.json").write_text(json.dumps({**cfg, **tokens}))
    for key, value in tokens.items():  # HF reads these at forward time
        setattr(hf.config, key, value)
    return hf


def add_mtp_weights(hf_dir: Path, seed: int = 0) -> None:
    """Random ``mtp.*`` tensors in HF layout, in a shard of their own: transformers has no MTP module, so its tiny
    Qwen3.5 checkpoints lack the head that released ones carry. Laid out as the converter reads them back (the
    expert layout of the checkpoint's other layers)."""
    import jax.numpy as jnp
    import numpy as np
    from safetensors.numpy import save_file

    from convert.converter import leaf_shapes_of
    from convert.mapping import build_sources, detect_expert_layout, normalize_name, region_shape
    from convert.safetensors_io import read_header, shard_files
    from qwenvl_jax.models.model import abstract_model

    cfg = load_config(hf_dir).with_mtp_layers(1)
    leaves = {p: s for p, s in leaf_shapes_of(abstract_model(cfg, jnp.float32)).items() if p[0] == "mtp"}
    names = {normalize_name(i.name): i for shard in shard_files(hf_dir) for i in read_header(shard)}
    layout = detect_expert_layout(names, cfg.text.hidden_size, cfg.text.moe_intermediate_size) if cfg.is_moe \
        else "split"
    rng = np.random.default_rng(seed)
    tensors = {}
    for name, src in build_sources(leaves, layout).items():
        shape = region_shape(leaves[src.leaf], src.index)
        if src.transform == "linear":  # ours is HF's weight transposed
            shape = shape[::-1]
        elif src.transform == "swap_last2":
            shape = (*shape[:-2], shape[-1], shape[-2])
        scale = 0.1 if len(shape) == 1 else 1.0 / np.sqrt(shape[-1])
        tensors[name] = (scale * rng.standard_normal(shape)).astype(np.float32)
    save_file(tensors, str(hf_dir / "mtp.safetensors"))
    index_file = hf_dir / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    index["weight_map"].update(dict.fromkeys(tensors, "mtp.safetensors"))
    index_file.write_text(json.dumps(index))


# What the official FP8 checkpoints keep unquantized.
FP8_KEEP = ("visual.", "lm_head.", "embed_tokens.", "mlp.gate.", "shared_expert_gate.")


def write_fp8_checkpoint(hf_dir: Path, fp8_dir: Path, deq_dir: Path, block: tuple[int, int] = (128, 128)) -> None:
    """Quantizes a tiny HF checkpoint to the fine-grained FP8 layout, independently of the converter (numpy,
    after HF's documented format): every 2-D ``*.weight`` of a linear layer not in FP8_KEEP becomes
    float8_e4m3fn with ``weight_scale_inv`` [ceil(out / block[0]), ceil(in / block[1])] fp32 (max |w| / 448 per
    block), and config.json gains ``quantization_config``. ``deq_dir`` gets the same model with those weights
    dequantized back to fp32 and no quantization: the reference."""
    import shutil

    import ml_dtypes
    import numpy as np
    from safetensors.numpy import load_file

    index = json.loads((hf_dir / "model.safetensors.index.json").read_text())
    tensors = {}
    for shard in sorted(set(index["weight_map"].values())):
        tensors.update(load_file(str(hf_dir / shard)))
    # transformers' fused experts: gate_up_proj [E, 2I, D], down_proj [E, D, I] (each expert [out, in]).
    for name in [n for n in tensors if n.endswith("mlp.experts.gate_up_proj")]:
        prefix = name[: -len(".gate_up_proj")]
        gate_up, down = tensors.pop(name), tensors.pop(prefix + ".down_proj")
        inter = gate_up.shape[1] // 2
        for e in range(gate_up.shape[0]):
            tensors[f"{prefix}.{e}.gate_proj.weight"] = gate_up[e, :inter]
            tensors[f"{prefix}.{e}.up_proj.weight"] = gate_up[e, inter:]
            tensors[f"{prefix}.{e}.down_proj.weight"] = down[e]
    quantized, dequantized = {}, {}
    bo, bi = block
    for name, w in tensors.items():
        if not (name.endswith(".weight") and w.ndim == 2 and not any(k in name for k in FP8_KEEP)):
            quantized[name] = dequantized[name] = w
            continue
        out, inp = w.shape
        nbo, nbi = -(-out // bo), -(-inp // bi)
        padded = np.zeros((nbo * bo, nbi * bi), np.float32)
        padded[:out, :inp] = w
        blocks = padded.reshape(nbo, bo, nbi, bi)
        scale = np.abs(blocks).max(axis=(1, 3)) / float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max)
        scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
        q = (blocks / scale[:, None, :, None]).reshape(padded.shape)[:out, :inp].astype(ml_dtypes.float8_e4m3fn)
        quantized[name], quantized[name + "_scale_inv"] = q, scale
        deq = (q.astype(np.float32).reshape(out, inp) * np.repeat(np.repeat(scale, bo, 0), bi, 1)[:out, :inp])
        dequantized[name] = deq.astype(np.float32)
    for directory, arrays, quant in ((fp8_dir, quantized, True), (deq_dir, dequantized, False)):
        shutil.copytree(hf_dir, directory)
        for f in directory.glob("*.safetensors"):
            f.unlink()
        save_safetensors(arrays, directory / "model.safetensors")
        (directory / "model.safetensors.index.json").unlink()
        if quant:
            cfg = json.loads((directory / "config.json").read_text())
            cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                          "weight_block_size": list(block),
                                          "modules_to_not_convert": [k.rstrip(".") for k in FP8_KEEP]}
            (directory / "config.json").write_text(json.dumps(cfg))


def save_safetensors(arrays: dict, path: Path) -> None:
    """safetensors' numpy writer has no float8: the format written by hand (8-byte little-endian header size,
    JSON header of dtype, shape and byte offsets, then the raw tensors)."""
    import ml_dtypes
    import numpy as np

    names = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(ml_dtypes.bfloat16): "BF16",
             np.dtype(ml_dtypes.float8_e4m3fn): "F8_E4M3", np.dtype(np.int64): "I64", np.dtype(np.int32): "I32"}
    header, blobs, offset = {}, [], 0
    for name, a in arrays.items():
        data = np.ascontiguousarray(a).tobytes()
        header[name] = {"dtype": names[np.dtype(a.dtype)], "shape": list(a.shape),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(len(head).to_bytes(8, "little") + head + b"".join(blobs))
