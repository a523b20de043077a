"""qwenvl_jax.processing against HF's processors, on the tiny offline assets of each family.

The HF reference is the family's real processor class (Qwen2_5_VLProcessor / Qwen3VLProcessor) with the PIL-backend
image processor. HF's video processors need torchvision; without it the reference processor is built without one
(its constructor's class check is relaxed for that argument only) and videos are checked against digests of HF's
output recorded with torchvision 0.29.1, torch 2.14.1, transformers 5.23.
"""

from __future__ import annotations

import hashlib
import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
from transformers import AutoTokenizer, ProcessorMixin
from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

from qwenvl_jax import tiny_checkpoint_assets
from qwenvl_jax.processing import Processor, resize_bicubic_uint8

FAMILIES = ["qwen2_5_vl", "qwen3_vl", "qwen3_5"]
HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None
VOCAB_SIZE = 600


def _hf_processor(directory: Path, family: str) -> ProcessorMixin:
    tokenizer = AutoTokenizer.from_pretrained(directory)
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(directory)
    cls = Qwen2_5_VLProcessor if family == "qwen2_5_vl" else Qwen3VLProcessor
    if HAS_TORCHVISION:
        from transformers import AutoVideoProcessor

        return cls(image_processor, tokenizer, AutoVideoProcessor.from_pretrained(directory),
                   chat_template=tokenizer.chat_template)
    original_check = ProcessorMixin.check_argument_for_proper_class

    def check_allowing_no_video_processor(self, name, argument):
        return None if name == "video_processor" and argument is None else original_check(self, name, argument)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ProcessorMixin, "check_argument_for_proper_class", check_allowing_no_video_processor)
        return cls(image_processor, tokenizer, None, chat_template=tokenizer.chat_template)


@pytest.fixture(scope="module", params=FAMILIES)
def processors(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    tiny_checkpoint_assets.save(directory, request.param, vocab_size=VOCAB_SIZE)
    return request.param, directory, Processor.from_pretrained(directory), _hf_processor(directory, request.param)


def _pattern(shape: tuple[int, ...]) -> np.ndarray:
    """Deterministic noise-like uint8 pixels (independent of numpy's RNG streams, which may change)."""
    axes = [np.arange(n).reshape([-1 if k == i else 1 for k in range(len(shape))]) for i, n in enumerate(shape)]
    primes = (7919, 104729, 1299709, 15485863)[-len(shape):]
    rows, cols = (axes[-3], axes[-2]) if len(shape) >= 3 else (axes[0], axes[1])  # spatial axes
    mixed = sum(a * p for a, p in zip(axes, primes)) + (rows * cols) % 17 * 31
    return (mixed % 251).astype(np.uint8)


def _assert_same(ours, hf_batch, keys=("input_ids", "attention_mask", "mm_token_type_ids", "image_grid_thw")):
    for key in keys:
        np.testing.assert_array_equal(getattr(ours, key), np.asarray(hf_batch[key]), err_msg=key)
    if "pixel_values" in hf_batch:
        assert ours.pixel_values.dtype == np.float32
        np.testing.assert_allclose(ours.pixel_values, hf_batch["pixel_values"], rtol=0, atol=1e-6)


def test_images_of_awkward_sizes_match_hf(processors):
    family, _, ours, hf = processors
    arrays = [_pattern((37, 1000, 3)), _pattern((1000, 37, 3)), _pattern((1, 2, 3)), _pattern((3, 3, 3)),
              _pattern((1500, 2000, 3))]
    rgba = PIL.Image.fromarray(np.dstack([_pattern((40, 60, 3)), _pattern((40, 60))]), "RGBA")
    grey = PIL.Image.fromarray(_pattern((45, 30)), "L")
    # Ours gets arrays and PIL images; HF gets PIL images with the channel layout stated (it guesses otherwise).
    ours_images = arrays + [rgba, grey]
    hf_images = [PIL.Image.fromarray(a) for a in arrays] + [rgba, grey]
    content = [{"type": "image", "image": im} for im in ours_images] + [{"type": "text", "text": "Compare them."}]
    messages = [{"role": "user", "content": content}]
    out = ours(messages)
    prompt = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ref = hf(text=[prompt], images=hf_images, input_data_format="channels_last", return_tensors="np")
    _assert_same(out, ref)
    # The large image was shrunk to within max_pixels.
    factor = ours.image_processor.patch_size * ours.image_processor.merge_size
    assert out.image_grid_thw[4, 1:].prod() <= ours.image_processor.size["longest_edge"] // factor**2 * 4


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_batch_of_image_and_text_only_conversations_matches_hf(processors, padding_side):
    family, _, ours, hf = processors
    image, other_image = _pattern((200, 300, 3)), _pattern((60, 50, 3))
    conversations = [
        [{"role": "system", "content": "Be brief."},
         {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What is it?"}]}],
        [{"role": "user", "content": "Hi."}],
        [{"role": "user", "content": [{"type": "text", "text": "And this?"}, {"type": "image", "image": other_image}]}],
    ]
    out = ours(conversations, padding_side=padding_side)
    prompts = [hf.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]
    ref = hf(text=prompts, images=[PIL.Image.fromarray(image), PIL.Image.fromarray(other_image)], padding=True,
             padding_side=padding_side, return_tensors="np")
    _assert_same(out, ref)
    assert (out.attention_mask == 0).any() and out.image_grid_thw.shape == (2, 3)


def test_plain_prompt_with_images_argument(processors):
    family, _, ours, hf = processors
    prompt = "A <|vision_start|><|image_pad|><|vision_end|> and a <|vision_start|><|image_pad|><|vision_end|>."
    images = [_pattern((64, 30, 3)), _pattern((200, 150, 3))]
    ref = hf(text=[prompt], images=[PIL.Image.fromarray(a) for a in images], return_tensors="np")
    _assert_same(ours(prompt, images=images), ref)


# HF's output for _pattern((9, 50, 70, 3)) at 3 fps in a one-turn conversation (see the module docstring).
VIDEO_REFERENCE = {
    "qwen2_5_vl": dict(grid=[[5, 4, 4]], second_per_grid_ts=[2 / 3], timestamps=None,
                       pixels="14a3c44c9f4ed98e79b047694a55a43d09eb1f2811f69db3d8a5d15f757c2f41",
                       input_ids="7ab9171215ad16561eb92d6719da5987fb7fa586e4fe80a6b475a64ed87afc94"),
    "qwen3_vl": dict(grid=[[3, 4, 4]], second_per_grid_ts=None, timestamps=[[1 / 3, 4 / 3, 7 / 3]],
                     pixels="b3f0cf539c3d7c40486076594019b93a5b7ac0a0e159a9dc2101fc447c371329",
                     input_ids="f8f6d3659948b482d171121d39cd2c196cb2683546c67ca1bc5475620714dc70"),
}
VIDEO_REFERENCE["qwen3_5"] = VIDEO_REFERENCE["qwen3_vl"]  # same processor class and assets


def _digest(array: np.ndarray, dtype) -> str:
    return hashlib.sha256(np.ascontiguousarray(array, dtype=dtype).tobytes()).hexdigest()


@pytest.mark.parametrize("as_frame_list", [False, True])
def test_short_video_matches_hf_reference(processors, as_frame_list):
    family, _, ours, hf = processors
    video = _pattern((9, 50, 70, 3))
    frames = [PIL.Image.fromarray(f) for f in video] if as_frame_list else video
    messages = [{"role": "user", "content": [{"type": "video", "video": frames, "fps": 3.0},
                                             {"type": "text", "text": "What happens?"}]}]
    out = ours(messages)
    expected = VIDEO_REFERENCE[family]
    assert out.video_grid_thw.tolist() == expected["grid"]
    assert _digest(out.pixel_values_videos, np.float32) == expected["pixels"]
    assert _digest(out.input_ids, np.int64) == expected["input_ids"]
    if expected["second_per_grid_ts"] is None:
        assert out.second_per_grid_ts is None
        np.testing.assert_allclose(out.video_timestamps, expected["timestamps"], rtol=1e-12)
    else:
        np.testing.assert_allclose(out.second_per_grid_ts, expected["second_per_grid_ts"], rtol=1e-7)
    assert (out.mm_token_type_ids == 2).sum() == out.video_grid_thw.prod() // 4
    if HAS_TORCHVISION:
        prompt = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ref = hf(text=[prompt], videos=[video], video_metadata=[{"total_num_frames": 9, "fps": 3.0}],
                 return_tensors="np")
        np.testing.assert_array_equal(out.pixel_values_videos, ref["pixel_values_videos"])
        _assert_same(out, ref, keys=("input_ids", "mm_token_type_ids", "video_grid_thw"))


# HF's Qwen2VLImageProcessor (torchvision backend) on the images below (recorded as VIDEO_REFERENCE).
TORCHVISION_IMAGE_REFERENCE = {
    "qwen2_5_vl": ("36879225610f0ad06a154c9810ee70f6f06dbe8921906c7cce8dbf9f4c123a3f",
                   [[1, 2, 72], [1, 4, 6], [1, 12, 18], [1, 6, 8]]),
    "qwen3_vl": ("1d6cd44d2c9235f9e395ae1c54ce47be550cba1d7131b6fffd1b3f92d80e5d57",
                 [[1, 2, 62], [1, 4, 6], [1, 12, 18], [1, 6, 8]]),
}
TORCHVISION_IMAGE_REFERENCE["qwen3_5"] = TORCHVISION_IMAGE_REFERENCE["qwen3_vl"]


def test_torchvision_style_images_match_hf_torchvision_backend(processors):
    family, directory, _, _ = processors
    ours = Processor.from_pretrained(directory, image_resize="torchvision")
    images = [_pattern((37, 1000, 3)), _pattern((1, 2, 3)), _pattern((1500, 2000, 3)), _pattern((90, 120, 3))]
    out = ours("<|image_pad|>" * len(images), images=images)
    digest, grids = TORCHVISION_IMAGE_REFERENCE[family]
    assert out.image_grid_thw.tolist() == grids
    assert _digest(out.pixel_values, np.float32) == digest
    if HAS_TORCHVISION:
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

        ref = Qwen2VLImageProcessor.from_pretrained(directory)([PIL.Image.fromarray(a) for a in images],
                                                               return_tensors="np")
        np.testing.assert_array_equal(out.pixel_values, ref["pixel_values"])


@pytest.mark.skipif(not HAS_TORCHVISION, reason="the reference resize is torchvision's")
def test_uint8_bicubic_resize_matches_torchvision():
    import torch
    import torchvision.transforms.v2.functional as tvF

    for h, w, new_h, new_w in [(37, 1000, 28, 1008), (5, 7, 64, 32), (300, 200, 56, 84), (64, 64, 64, 96)]:
        frames = _pattern((2, h, w, 3))
        ref = tvF.resize(torch.from_numpy(frames).permute(0, 3, 1, 2), [new_h, new_w],
                         interpolation=tvF.InterpolationMode.BICUBIC, antialias=True)
        np.testing.assert_array_equal(resize_bicubic_uint8(frames, new_h, new_w), ref.permute(0, 2, 3, 1).numpy())


def test_bad_inputs_raise_clear_errors(processors, tmp_path):
    family, directory, ours, _ = processors
    ask = lambda image: ours([{"role": "user", "content": [{"type": "image", "image": image}]}])  # noqa: E731
    garbage = tmp_path / "broken.png"
    garbage.write_bytes(b"not a png at all")
    with pytest.raises(ValueError, match="cannot read image file .*broken.png"):
        ask(str(garbage))
    with pytest.raises(ValueError, match="cannot read image file .*missing.jpg"):
        ask(str(tmp_path / "missing.jpg"))
    with pytest.raises(ValueError, match=r"\[H, W, 3\] RGB array, got shape \(8, 8, 4\) \(4 channels\)"):
        ask(np.zeros((8, 8, 4), np.uint8))
    with pytest.raises(ValueError, match=r"got shape \(8, 8\)"):
        ask(np.zeros((8, 8), np.uint8))
    with pytest.raises(ValueError, match="expected uint8 pixels, got float32"):
        ask(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="never downloads"):
        ask("https://example.com/cat.jpg")
    # A 20x3900 image (aspect 195) keeps one merge window of height, overshooting max_pixels.
    with pytest.raises(ValueError, match=r"image 0 of size 3900x20 becomes \d+ patches, more than the configured "
                                         r"maximum of \d+"):
        ask(np.zeros((20, 3900, 3), np.uint8))
    small = Processor.from_pretrained(directory, max_image_patches=16)
    with pytest.raises(ValueError, match="more than the configured maximum of 16"):
        small("<|image_pad|>", images=[np.zeros((200, 200, 3), np.uint8)])
    with pytest.raises(ValueError, match=r"2 image placeholder\(s\) \(<\|image_pad\|>\) but 1 image\(s\) were given"):
        ours("<|image_pad|> and <|image_pad|>", images=[np.zeros((30, 30, 3), np.uint8)])
    with pytest.raises(ValueError, match=r"1 image placeholder\(s\) .* but 2 image\(s\) were given"):
        ours("<|image_pad|>", images=[np.zeros((30, 30, 3), np.uint8)] * 2)
    with pytest.raises(ValueError, match=r"0 video placeholder\(s\) .* but 1 video\(s\) were given"):
        ours("no video here", videos=[np.zeros((4, 30, 30, 3), np.uint8)])
    with pytest.raises(ValueError, match="video 0: video file 'no/such/clip.mp4' does not exist"):
        ours("<|video_pad|>", videos=["no/such/clip.mp4"])


@pytest.mark.skipif(not HAS_TORCHVISION, reason="HF's Qwen VL processors need torchvision for their video half")
def test_hf_auto_processor_loads_tiny_assets(processors):
    from transformers import AutoProcessor

    family, directory, ours, _ = processors
    hf = AutoProcessor.from_pretrained(directory)
    assert type(hf).__name__ == ("Qwen2_5_VLProcessor" if family == "qwen2_5_vl" else "Qwen3VLProcessor")
    assert hf.image_token_id == ours.image_token_id and hf.video_token_id == ours.video_token_id
    assert hf.video_processor.temporal_patch_size == ours.video.temporal_patch_size


def test_tiny_assets_special_token_layout(tmp_path):
    ids = tiny_checkpoint_assets.save(tmp_path / "a", "qwen3_vl", vocab_size=400, first_special_id=300)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "a")
    assert [ids[t] for t in ("<|endoftext|>", "<|vision_start|>", "<|image_pad|>", "<|video_pad|>")] == \
        [300, 309, 312, 313]
    assert tokenizer.convert_tokens_to_ids(list(ids)) == list(ids.values())
    text = "<|im_start|>user\nHello world 42<|im_end|>"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    assert max(tokenizer(text)["input_ids"]) < 400
    with pytest.raises(ValueError, match="do not fit in vocab_size"):
        tiny_checkpoint_assets.save(tmp_path / "b", "qwen2_5_vl", vocab_size=300, first_special_id=290)
    with pytest.raises(ValueError, match="byte-level alphabet alone needs 256"):
        tiny_checkpoint_assets.save(tmp_path / "c", "qwen2_5_vl", vocab_size=270)


def test_runs_without_torch(tmp_path):
    """Preprocessing must work where torch is not installed: run it with torch made unimportable."""
    tiny_checkpoint_assets.save(tmp_path, "qwen3_vl", vocab_size=VOCAB_SIZE)
    script = (
        "import sys; sys.modules['torch'] = None; sys.modules['torchvision'] = None\n"
        "import numpy as np\n"
        "from qwenvl_jax.processing import Processor\n"
        f"p = Processor.from_pretrained({str(tmp_path)!r})\n"
        "out = p('<|image_pad|><|video_pad|>', images=[np.zeros((40, 50, 3), np.uint8)],\n"
        "        videos=[np.zeros((4, 40, 50, 3), np.uint8)], video_fps=2.0)\n"
        "assert 'torch' not in {m.split('.')[0] for m, v in sys.modules.items() if v is not None}\n"
        "print(out.pixel_values.shape, out.pixel_values_videos.shape)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parents[1], timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
