"""Config parsing: every supported model_type, and clear errors naming the field at fault."""

from __future__ import annotations

import copy
import dataclasses

import pytest

from qwenvl_jax.config import MODEL_TYPES, parse_config
from qwenvl_jax.tiny_model import TINY_CONFIGS, hf_config_dict


def _config(model_type: str) -> dict:
    text, vision = TINY_CONFIGS[model_type]
    return hf_config_dict(model_type, dict(text), dict(vision))


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_every_family_parses_and_is_hashable(model_type):
    cfg = parse_config(_config(model_type))
    assert cfg.model_type == model_type
    assert hash(cfg) == hash(parse_config(_config(model_type)))
    assert cfg.vision is not None and cfg.vision.out_hidden_size == cfg.text.hidden_size


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_text_only_layout(model_type):
    text_model_type = f"{model_type}_text"
    assert text_model_type in MODEL_TYPES
    raw = dict(_config(model_type)["text_config"], model_type=text_model_type)
    cfg = parse_config(raw)
    full = parse_config(_config(model_type)).text
    assert cfg.vision is None
    assert dataclasses.replace(cfg.text, tie_word_embeddings=full.tie_word_embeddings) == full


def test_flat_qwen2_5_vl_hub_layout():
    """Hub Qwen2.5-VL configs keep text fields at the top level with legacy rope_scaling."""
    raw = _config("qwen2_5_vl")
    text = raw.pop("text_config")
    rope = text.pop("rope_parameters")
    raw.update(text, model_type="qwen2_5_vl", rope_theta=rope["rope_theta"],
               rope_scaling={"type": "mrope", "mrope_section": rope["mrope_section"]})
    cfg = parse_config(raw)
    assert cfg.text.mrope_section == tuple(rope["mrope_section"]) and not cfg.text.mrope_interleaved


def test_qwen3_5_flags():
    t = parse_config(_config("qwen3_5")).text
    assert t.attn_output_gate and t.norm_zero_centered and t.qk_norm and t.mrope_interleaved
    assert t.layer_types == ("linear_attention",) * 3 + ("full_attention",)
    assert t.rotary_dim == 8


def test_unknown_model_type():
    with pytest.raises(ValueError, match="unsupported model_type 'llama'"):
        parse_config({"model_type": "llama"})


@pytest.mark.parametrize("field", ["hidden_size", "num_hidden_layers", "vocab_size", "linear_key_head_dim"])
def test_missing_text_field_is_named(field):
    raw = _config("qwen3_5")
    del raw["text_config"][field]
    with pytest.raises(ValueError, match=f"'text_config.{field}' is missing"):
        parse_config(raw)


def test_missing_vision_field_is_named():
    raw = _config("qwen3_vl")
    del raw["vision_config"]["patch_size"]
    with pytest.raises(ValueError, match="'vision_config.patch_size' is missing"):
        parse_config(raw)


def test_mrope_sections_must_sum_to_rotary_half_dim():
    raw = _config("qwen3_vl")
    raw["text_config"]["rope_parameters"]["mrope_section"] = [2, 3, 4]
    with pytest.raises(ValueError, match=r"mrope_section' \[2, 3, 4\] must have 3 entries summing to the rotary "
                                         r"half-dim 8"):
        parse_config(raw)


@pytest.mark.parametrize("mutate,message", [
    (lambda t: t.update(num_key_value_heads=3), "not a multiple of num_key_value_heads"),
    (lambda t: t.update(linear_num_value_heads=3), "linear_num_value_heads' .3. is not a multiple"),
    (lambda t: t.update(layer_types=["full_attention"] * 3), "layer_types' has 3 entries"),
    (lambda t: t.update(hidden_size=-64), "hidden_size' must be a positive integer"),
    (lambda t: t["rope_parameters"].update(rope_type="yarn"), "rope_type' 'yarn' is not supported"),
])
def test_contradictory_fields(mutate, message):
    raw = copy.deepcopy(_config("qwen3_5"))
    mutate(raw["text_config"])
    with pytest.raises(ValueError, match=message):
        parse_config(raw)


def test_vision_width_must_match_text():
    raw = _config("qwen3_vl")
    raw["vision_config"]["out_hidden_size"] = 32
    with pytest.raises(ValueError, match="out_hidden_size"):
        parse_config(raw)
