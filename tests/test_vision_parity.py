"""Vision towers and multimodal logits against HF transformers, fp32 on the CPU.

Inputs come from our torch-free ``Processor`` over the tiny checkpoint's tokenizer and processor configs, so the
whole path (chat messages, images, videos -> logits) is compared; HF gets the very same arrays.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import qwenvl_jax as qj
from qwenvl_jax.models.model import multimodal_logits_fn
from qwenvl_jax.models.multimodal import fuse_vision
from qwenvl_jax.models.vision import prepare_vision_inputs
from qwenvl_jax.processing import Processor
from tests.hf_tiny import build_hf_checkpoint

torch = pytest.importorskip("torch")

# One variant per family; both DeepStack tap sets of Qwen3-VL ([0] and [0, 1]) and a late tap ([1], MoE).
PARITY_VARIANTS = ["qwen2_5_vl-a", "qwen3_vl-a", "qwen3_vl-b", "qwen3_vl_moe-b", "qwen3_5-b", "qwen3_5_moe-a"]
VOCAB = 512  # hf_tiny's vocab: the special tokens take its top ids


def _image(seed: int, height: int, width: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


IMAGE_A, IMAGE_B = _image(1, 50, 90), _image(2, 130, 40)  # different sizes and aspect ratios
VIDEO = np.random.default_rng(3).integers(0, 256, (8, 64, 96, 3), dtype=np.uint8)


def _user(*parts) -> list[dict]:
    content = [{"type": "image", "image": p} if isinstance(p, np.ndarray) and p.ndim == 3 else
               {"type": "video", "video": p, "fps": 2.0} if isinstance(p, np.ndarray) else
               {"type": "text", "text": p} for p in parts]
    return [{"role": "user", "content": content}]


# One padded batch holds every kind of request, so each family compiles one multimodal program: one image, two
# images of different sizes, one video, and a text-only row; the video row is the longest, so the others are
# left-padded.
BATCH = {
    "one image": _user(IMAGE_A, "Describe this."),
    "two images": _user(IMAGE_A, "and", IMAGE_B, "Which is larger?"),
    "one video": _user(VIDEO, "What happens in this video? Answer in one sentence."),
    "text only": _user("A text-only request in a batch with images."),
}


@pytest.fixture(scope="module", params=PARITY_VARIANTS)
def setup(request, tmp_path_factory):
    """(HF model, our model, processor) over one tiny random checkpoint with tokenizer and processor files."""
    directory = tmp_path_factory.mktemp(request.param)
    hf = build_hf_checkpoint(request.param, directory, vocab_size=VOCAB)
    return hf, qj.load(directory, dtype="float32"), Processor.from_pretrained(directory)


def _relative_error(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(got - ref).max() / np.abs(ref).max())


def _hf_inputs(inputs) -> dict:
    names = ["input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw",
             "pixel_values_videos", "video_grid_thw", "second_per_grid_ts"]
    return {n: torch.tensor(getattr(inputs, n)) for n in names if getattr(inputs, n) is not None}


def test_vision_tower_matches_hf(setup):
    """Two images and a video packed into one call of our tower vs HF's tower run on images and video apart,
    merged tokens and DeepStack features; also padded to a patch bucket, where the real tokens must not move."""
    hf, ours, processor = setup
    inputs = processor([_user(IMAGE_A, IMAGE_B, VIDEO, "?")])
    refs = []
    with torch.no_grad():
        for pixels, grids in ((inputs.pixel_values, inputs.image_grid_thw),
                              (inputs.pixel_values_videos, inputs.video_grid_thw)):
            out = hf.model.visual(torch.tensor(pixels), grid_thw=torch.tensor(grids), return_dict=True)
            refs.append([out.pooler_output.numpy()] + [f.numpy() for f in getattr(out, "deepstack_features", [])])
    ref = [np.concatenate(parts) for parts in zip(*refs)]

    grids = np.concatenate([inputs.image_grid_thw, inputs.video_grid_thw])
    patches = np.concatenate([inputs.pixel_values, inputs.pixel_values_videos])
    tower = jax.jit(lambda params, *args: nnx.merge(ours.graphdef, params).visual(*args))
    bucket = 1 << len(patches).bit_length()  # at least one more patch than needed
    padded = np.concatenate([patches, np.zeros((bucket - len(patches), patches.shape[1]), patches.dtype)])
    for name, call in (("packed", (patches, prepare_vision_inputs(ours.config.vision, grids))),
                       ("padded", (padded, prepare_vision_inputs(ours.config.vision, grids, pad_to=bucket)))):
        merged, deepstack = tower(ours.params, *call)
        got = [np.asarray(merged)] + ([] if deepstack is None else list(np.asarray(deepstack)))
        assert len(got) == 1 + len(ours.config.vision.deepstack_visual_indexes) == len(ref)
        for what, g, r in zip(["merger"] + [f"deepstack[{i}]" for i in range(len(got) - 1)], got, ref):
            g = g[: len(r)]
            assert _relative_error(g, r) < 1e-4, f"{name} {what}: {_relative_error(g, r):.2e}"


def test_bucketed_calls_share_shapes(setup):
    """Padded to one bucket, images of different sizes in one width class give identically shaped inputs: one
    compiled tower serves them all."""
    cfg = setup[1].config.vision
    shapes = {str(jax.tree.map(np.shape, prepare_vision_inputs(cfg, np.array(grid), pad_to=256)))
              for grid in ([[1, 4, 6]], [[1, 4, 8]], [[1, 6, 4]], [[1, 8, 4]])}
    assert len(shapes) == 1, shapes


def test_logits_match_hf(setup):
    hf, ours, processor = setup
    inputs = processor(list(BATCH.values()))
    assert (inputs.attention_mask[:, 0] == 0).sum() == len(BATCH) - 1, "all rows but the video one are padded"
    with torch.no_grad():
        ref = hf(**_hf_inputs(inputs)).logits.numpy()
    got = ours.logits(inputs.input_ids, inputs.attention_mask, pixel_values=inputs.pixel_values,
                      image_grid_thw=inputs.image_grid_thw, pixel_values_videos=inputs.pixel_values_videos,
                      video_grid_thw=inputs.video_grid_thw, second_per_grid_ts=inputs.second_per_grid_ts)
    real = inputs.attention_mask.astype(bool)
    assert np.isfinite(got).all()
    errors = {name: _relative_error(got[row][real[row]], ref[row][real[row]]) for row, name in enumerate(BATCH)}
    assert max(errors.values()) < 1e-4, f"max |ours - HF| / max |HF| per row: {errors}"
    assert not got[~real].any(), "padded positions must come back as zeros"


def test_single_image_request_matches_hf(setup):
    """The common request: one row, no padding, no attention mask."""
    hf, ours, processor = setup
    inputs = processor([BATCH["one image"]])
    with torch.no_grad():
        ref = hf(**_hf_inputs(inputs)).logits.numpy()
    got = ours.logits(inputs.input_ids, pixel_values=inputs.pixel_values, image_grid_thw=inputs.image_grid_thw)
    assert _relative_error(got, ref) < 1e-4, f"{_relative_error(got, ref):.2e}"


def test_text_only_request_skips_the_vision_tower(setup):
    hf, ours, processor = setup
    inputs = processor([_user("No image here.")])
    compiled = multimodal_logits_fn._cache_size()
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(inputs.input_ids)).logits.numpy()
    got = ours.logits(inputs.input_ids, inputs.attention_mask)
    assert _relative_error(got, ref) < 1e-4
    assert multimodal_logits_fn._cache_size() == compiled


def _image_request(processor) -> tuple[np.ndarray, dict]:
    inputs = processor([_user(IMAGE_A, IMAGE_B, "?")])
    return inputs.input_ids, dict(pixel_values=inputs.pixel_values, image_grid_thw=inputs.image_grid_thw)


def _without_first(ids: np.ndarray, token_id: int) -> np.ndarray:
    keep = np.ones(ids.shape[1], bool)
    keep[np.flatnonzero(ids[0] == token_id)[0]] = False
    return ids[:, keep]


def test_bad_inputs_raise_clear_errors(setup):
    _, ours, processor = setup
    ids, vision = _image_request(processor)
    image_token = ours.config.image_token_id
    grids, pixels = vision["image_grid_thw"], vision["pixel_values"]
    cases = [
        (dict(input_ids=ids), "image placeholder tokens but no pixel_values"),
        (dict(input_ids=_without_first(ids, image_token), **vision), "placeholder tokens but image_grid_thw"),
        (dict(input_ids=ids, pixel_values=pixels[:, :-1], image_grid_thw=grids), "pixel_values must be a float"),
        (dict(input_ids=ids, pixel_values=pixels[:-4], image_grid_thw=grids), "describes"),
        (dict(input_ids=ids, pixel_values=pixels.astype(np.int32), image_grid_thw=grids), "float array"),
        (dict(input_ids=ids, pixel_values=pixels, image_grid_thw=grids + [[0, 1, 0], [0, 0, 0]]),
         "multiples of the spatial merge size"),
        (dict(input_ids=ids, pixel_values=pixels), "must be given together"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            ours.logits(**kwargs)
    ours.max_vision_patches = int(grids.prod(axis=1).max()) - 1
    try:
        with pytest.raises(ValueError, match="more than the configured maximum"):
            ours.logits(ids, **vision)
    finally:
        ours.max_vision_patches = qj.qwenvl.DEFAULT_MAX_VISION_PATCHES


def test_fuse_vision_places_tokens_and_drops_out_of_range_ones():
    embeds_btd = jnp.zeros((2, 3, 4), jnp.float32)
    visual_md = np.arange(12, dtype=np.float32).reshape(3, 4) + 1
    deepstack_kmd = np.stack([visual_md, -visual_md])
    dest_m = np.array([4, 0, 6])  # row 1 position 1, row 0 position 0, past the batch (a padding token)
    embeds, deep = fuse_vision(embeds_btd, visual_md, deepstack_kmd, dest_m)
    expected = np.zeros((6, 4), np.float32)
    expected[[4, 0]] = visual_md[:2]
    np.testing.assert_array_equal(np.asarray(embeds).reshape(6, 4), expected)
    np.testing.assert_array_equal(np.asarray(deep).reshape(2, 6, 4), np.stack([expected, -expected]))
