"""get_rope_index against HF's Model.get_rope_index of each family on tiny HF models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import Qwen2_5_VLConfig, Qwen3_5Config, Qwen3VLConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel
from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5Model
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLModel

from qwenvl_jax.config import parse_config
from qwenvl_jax.models.rope_index import get_rope_index, modality_types

VISION_START, VISION_END, IMAGE, VIDEO, PAD = 500, 501, 502, 503, 504
MERGE = 2

_TEXT = dict(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
             num_key_value_heads=1, head_dim=16)
_VISION = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32,
               spatial_merge_size=MERGE, temporal_patch_size=2)
_IDS = dict(image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=VISION_START,
            vision_end_token_id=VISION_END)


def _hf_config(family: str):
    if family == "qwen2_5_vl":
        return Qwen2_5_VLConfig(
            text_config=dict(_TEXT, rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3],
                                                     "rope_theta": 10000.0}),
            vision_config=dict(_VISION, patch_size=14, window_size=56, fullatt_block_indexes=[0],
                               tokens_per_second=2), **_IDS)
    rope = {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0, "mrope_interleaved": True}
    vision = dict(_VISION, patch_size=16, num_position_embeddings=16, deepstack_visual_indexes=[0])
    if family == "qwen3_vl":
        return Qwen3VLConfig(text_config=dict(_TEXT, rope_parameters=rope), vision_config=vision, **_IDS)
    return Qwen3_5Config(
        text_config=dict(_TEXT, layer_types=["full_attention"],
                         rope_parameters=dict(rope, mrope_section=[1, 1, 0], partial_rotary_factor=0.25),
                         linear_conv_kernel_dim=4, linear_key_head_dim=8, linear_value_head_dim=8,
                         linear_num_key_heads=1, linear_num_value_heads=1),
        vision_config=vision, **_IDS)


_MODEL_CLASS = {"qwen2_5_vl": Qwen2_5_VLModel, "qwen3_vl": Qwen3VLModel, "qwen3_5": Qwen3_5Model}


@pytest.fixture(scope="module", params=["qwen2_5_vl", "qwen3_vl", "qwen3_5"])
def family_models(request):
    hf_config = _hf_config(request.param)
    torch.manual_seed(0)
    return request.param, _MODEL_CLASS[request.param](hf_config).eval(), parse_config(hf_config.to_dict())


def _text(n: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(0, 400, n).tolist()


def _image(grid_thw: tuple[int, int, int]) -> list[int]:
    return [VISION_START] + [IMAGE] * (int(np.prod(grid_thw)) // MERGE**2) + [VISION_END]


def _video(family: str, grid_thw: tuple[int, int, int]) -> list[int]:
    per_frame = grid_thw[1] * grid_thw[2] // MERGE**2
    if family == "qwen2_5_vl":
        return [VISION_START] + [VIDEO] * (grid_thw[0] * per_frame) + [VISION_END]
    # Qwen3-VL / Qwen3.5: "<t seconds>" text, then one placeholder run per temporal patch.
    frames = []
    for k in range(grid_thw[0]):
        frames += _text(3, 100 + k) + [VISION_START] + [VIDEO] * per_frame + [VISION_END]
    return frames


def _compare(model, config, rows: list[list[int]], padding_side: str = "right", image_grid_thw=None,
             video_grid_thw=None, second_per_grid_ts=None):
    length = max(map(len, rows))
    input_ids = np.full((len(rows), length), PAD, dtype=np.int64)
    attention_mask = np.zeros((len(rows), length), dtype=np.int64)
    for b, row in enumerate(rows):
        sl = slice(0, len(row)) if padding_side == "right" else slice(length - len(row), length)
        input_ids[b, sl], attention_mask[b, sl] = row, 1
    ours_pos, ours_delta = get_rope_index(config, input_ids, image_grid_thw=image_grid_thw,
                                          video_grid_thw=video_grid_thw, second_per_grid_ts=second_per_grid_ts,
                                          attention_mask=attention_mask)
    as_torch = lambda a, dt=torch.long: None if a is None else torch.tensor(np.asarray(a), dtype=dt)  # noqa: E731
    kwargs = dict(second_per_grid_ts=as_torch(second_per_grid_ts, torch.float32)) \
        if config.family == "qwen2_5_vl" else {}
    hf_pos, hf_delta = model.get_rope_index(
        torch.tensor(input_ids), mm_token_type_ids=torch.tensor(modality_types(input_ids, IMAGE, VIDEO)),
        image_grid_thw=as_torch(image_grid_thw), video_grid_thw=as_torch(video_grid_thw),
        attention_mask=torch.tensor(attention_mask), **kwargs)
    np.testing.assert_array_equal(ours_pos, hf_pos.numpy())
    np.testing.assert_array_equal(ours_delta, hf_delta.numpy().reshape(-1))
    assert ours_pos.dtype == np.int64 and ours_delta.shape == (len(rows),)
    return ours_pos, ours_delta


def test_text_only(family_models):
    family, model, config = family_models
    pos, delta = _compare(model, config, [_text(9, 0)])
    np.testing.assert_array_equal(pos[:, 0], np.broadcast_to(np.arange(9), (3, 9)))
    assert delta.tolist() == [0]


def test_one_image(family_models):
    family, model, config = family_models
    grid = (1, 6, 10)
    _, delta = _compare(model, config, [_text(5, 1) + _image(grid) + _text(4, 2)], image_grid_thw=[grid])
    # 15 image tokens occupy max(3, 5) = 5 positions.
    assert delta.tolist() == [5 - 15]


def test_two_images_of_different_sizes(family_models):
    family, model, config = family_models
    grids = [(1, 4, 8), (1, 10, 2)]
    row = _text(3, 3) + _image(grids[0]) + _text(2, 4) + _image(grids[1]) + _text(6, 5)
    _compare(model, config, [row], image_grid_thw=grids)


@pytest.mark.parametrize("seconds", [None, 2 / 3, 0.5])
def test_one_video(family_models, seconds):
    family, model, config = family_models
    grid = (3, 4, 6)
    row = _text(4, 6) + _video(family, grid) + _text(3, 7)
    _compare(model, config, [row], video_grid_thw=[grid],
             second_per_grid_ts=None if seconds is None else [seconds])


def test_image_and_video(family_models):
    family, model, config = family_models
    row = _text(2, 8) + _video(family, (2, 4, 4)) + _text(2, 9) + _image((1, 6, 4)) + _text(2, 10)
    _compare(model, config, [row], image_grid_thw=[(1, 6, 4)], video_grid_thw=[(2, 4, 4)],
             second_per_grid_ts=[1.0])


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_padded_batch_of_image_row_and_text_row(family_models, padding_side):
    family, model, config = family_models
    grid = (1, 8, 4)
    image_row = _text(3, 11) + _image(grid) + _text(5, 12)
    text_row = _text(7, 13)
    pos, delta = _compare(model, config, [image_row, text_row, image_row], padding_side, image_grid_thw=[grid, grid])
    assert delta[1] == 0
    pad = slice(0, len(image_row) - len(text_row)) if padding_side == "left" else slice(len(text_row), None)
    assert (pos[:, 1, pad] == 0).all()


def test_placeholder_and_grid_count_mismatch_is_rejected(family_models):
    family, model, config = family_models
    row = _text(2, 14) + _image((1, 4, 4)) + _text(2, 15) + _image((1, 4, 4))
    with pytest.raises(ValueError, match="more image placeholder runs than image grids"):
        get_rope_index(config, np.array([row]), image_grid_thw=[(1, 4, 4)])
    with pytest.raises(ValueError, match="more image grids were given"):
        get_rope_index(config, np.array([row]), image_grid_thw=[(1, 4, 4)] * 3)
    with pytest.raises(ValueError, match="does not match its grid"):
        get_rope_index(config, np.array([row]), image_grid_thw=[(1, 4, 4), (1, 8, 4)])
