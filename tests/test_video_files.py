"""Video files in messages (qwenvl_jax.video_io, PyAV): decoded frames and fps, and processor output identical to
the same frames passed as an array with the file's fps. The test writes its own small mp4 with PyAV."""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from qwenvl_jax import tiny_checkpoint_assets, video_io
from qwenvl_jax.processing import Processor

FAMILIES = ["qwen2_5_vl", "qwen3_vl", "qwen3_5"]
FRAMES, HEIGHT, WIDTH, FPS = 24, 48, 64, 8
needs_av = pytest.mark.skipif(importlib.util.find_spec("av") is None, reason="PyAV (the video extra) is absent")


def _moving_pattern() -> np.ndarray:
    """[24, 48, 64, 3] uint8: colour gradients that drift with time and a bright square moving across."""
    t, y, x = np.meshgrid(np.arange(FRAMES), np.arange(HEIGHT), np.arange(WIDTH), indexing="ij")
    frames = np.stack([(x * 4 + t * 9) % 256, (y * 5 + t * 7) % 256, ((x + y) * 2 + t * 11) % 256], axis=-1)
    for k in range(FRAMES):
        top, left = 4 + k % 8 * 4, 2 + k * 2
        frames[k, top:top + 12, left:left + 12] = (250, 250, 40)
    return frames.astype(np.uint8)


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    av = pytest.importorskip("av")
    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    codec = next(c for c in ("libx264", "mpeg4") if c in av.codecs_available)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=FPS)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        stream.options = {"qp": "0"} if codec == "libx264" else {"qscale": "1"}
        for frame in _moving_pattern():
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path


def _pyav_frames(path: Path) -> tuple[np.ndarray, float]:
    """The reference: every frame as PyAV decodes it, and the stream's average rate."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return (np.stack([f.to_ndarray(format="rgb24") for f in container.decode(stream)]),
                float(stream.average_rate))


@pytest.fixture(scope="module", params=FAMILIES)
def processor(request, tmp_path_factory) -> Processor:
    directory = tmp_path_factory.mktemp(request.param)
    tiny_checkpoint_assets.save(directory, request.param, vocab_size=600)
    return Processor.from_pretrained(directory)


def _messages(video, **extra) -> list[dict]:
    return [{"role": "user", "content": [{"type": "video", "video": video, **extra},
                                         {"type": "text", "text": "What happens?"}]}]


def _assert_same_output(a, b) -> None:
    for key in ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values_videos", "video_grid_thw",
                "second_per_grid_ts"):
        x, y = getattr(a, key), getattr(b, key)
        assert (x is None) == (y is None), key
        if x is not None:
            np.testing.assert_array_equal(x, y, err_msg=key)
    assert a.video_timestamps == b.video_timestamps


@needs_av
def test_decoded_frames_and_fps_are_pyavs(clip):
    frames, fps = _pyav_frames(clip)
    assert frames.shape == (FRAMES, HEIGHT, WIDTH, 3) and fps == FPS
    assert np.abs(frames.astype(int) - _moving_pattern()).mean() < 8  # the codec kept the picture
    whole = video_io.read_video(clip)
    assert whole.fps == FPS and whole.total_frames == FRAMES and whole.indices is None
    np.testing.assert_array_equal(whole.frames, frames)
    seen = []
    some = video_io.read_video(str(clip), lambda total, rate: seen.append((total, rate)) or [0, 5, 5, 23])
    assert seen == [(FRAMES, FPS)]
    np.testing.assert_array_equal(some.frames, frames[[0, 5, 5, 23]])
    assert some.indices.tolist() == [0, 5, 5, 23] and some.total_frames == FRAMES


@needs_av
@pytest.mark.parametrize("header_frames", [0, 20, 30])
def test_missing_or_wrong_frame_count_in_header(clip, monkeypatch, header_frames):
    """Sampling uses the frames actually decoded, whatever the container's header says."""
    real_probe = video_io._probe
    monkeypatch.setattr(video_io, "_probe", lambda av, source: (header_frames, real_probe(av, source)[1]))
    seen = []
    got = video_io.read_video(clip, lambda total, rate: seen.append(total) or np.linspace(0, total - 1, 5).round())
    assert seen[-1] == FRAMES and got.total_frames == FRAMES
    np.testing.assert_array_equal(got.frames, _pyav_frames(clip)[0][[0, 6, 12, 17, 23]])


@needs_av
def test_file_gives_what_its_frames_and_fps_give(processor, clip):
    frames, fps = _pyav_frames(clip)
    from_array = processor(_messages(frames, fps=fps))
    _assert_same_output(processor(_messages(str(clip))), from_array)
    _assert_same_output(processor(_messages(clip)), from_array)
    _assert_same_output(processor([{"role": "user", "content": [{"type": "video", "path": str(clip)},
                                                                {"type": "text", "text": "What happens?"}]}]),
                        from_array)
    prompt = "<|vision_start|><|video_pad|><|vision_end|>What?"
    _assert_same_output(processor(prompt, videos=[clip]), processor(prompt, videos=[frames], video_fps=[fps]))
    # The fps matters (else the checks above prove nothing): the default 24 fps gives other output ...
    default_fps = processor(_messages(frames))
    if processor.family == "qwen2_5_vl":
        assert default_fps.second_per_grid_ts.tolist() != from_array.second_per_grid_ts.tolist()
        np.testing.assert_allclose(from_array.second_per_grid_ts, [2 / FPS])
    else:
        assert default_fps.video_timestamps != from_array.video_timestamps
        assert default_fps.video_grid_thw.tolist() != from_array.video_grid_thw.tolist()  # 4 frames, not 6
    # ... and an fps given with a file overrides the container's.
    _assert_same_output(processor(_messages(str(clip), fps=24.0)), default_fps)


@needs_av
def test_qwen2_5_vl_fps_sampling_of_a_file(tmp_path, clip):
    tiny_checkpoint_assets.save(tmp_path, "qwen2_5_vl", vocab_size=600)
    processor = Processor.from_pretrained(tmp_path)
    processor.video = dataclasses.replace(processor.video, do_sample_frames=True, fps=2.0)
    frames, fps = _pyav_frames(clip)
    out = processor(_messages(str(clip)))
    _assert_same_output(out, processor(_messages(frames, fps=fps)))
    assert out.video_grid_thw[0, 0] == 3  # 24 frames at 8 fps -> 6 frames at 2 fps -> 3 temporal patches
    np.testing.assert_allclose(out.second_per_grid_ts, [1.0])


@needs_av
def test_hf_pyav_reader_agrees(clip):
    from transformers.video_utils import load_video

    ours = video_io.read_video(clip, lambda total, rate: np.linspace(0, total - 1, 6).round().astype(int))
    hf_frames, hf_meta = load_video(str(clip), backend="pyav", sample_indices_fn=lambda metadata, **_: ours.indices)
    np.testing.assert_array_equal(hf_frames, ours.frames)
    assert (hf_meta.fps, hf_meta.total_num_frames) == (ours.fps, ours.total_frames)


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is None or importlib.util.find_spec("av") is None,
                    reason="HF's Qwen video processors need torchvision (and PyAV for this file)")
def test_hf_video_processor_agrees(tmp_path, clip):
    """HF's processor on the frames its PyAV reader decodes, with that reader's metadata, against ours on the file."""
    from transformers.video_utils import load_video

    from tests.test_processing import _hf_processor

    for family in FAMILIES:
        directory = tmp_path / family
        tiny_checkpoint_assets.save(directory, family, vocab_size=600)
        ours, hf = Processor.from_pretrained(directory), _hf_processor(directory, family)
        frames, meta = load_video(str(clip), backend="pyav")
        messages = _messages(str(clip))
        prompt = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ref = hf(text=[prompt], videos=[frames], return_tensors="np",
                 video_metadata=[{"total_num_frames": meta.total_num_frames, "fps": meta.fps}])
        out = ours(messages)
        for key in ("pixel_values_videos", "video_grid_thw"):
            np.testing.assert_array_equal(getattr(out, key), ref[key], err_msg=f"{family} {key}")
        if family == "qwen2_5_vl":
            np.testing.assert_allclose(out.second_per_grid_ts, ref["second_per_grid_ts"], rtol=1e-6)
        # The timestamps in the prompt and the video tokens (not the whole prompt: transformers >= 5.25 drops the
        # template's outer <|vision_start|>/<|vision_end|> around a Qwen3-VL video, which this library keeps).
        texts = [hf.tokenizer.decode(ids) for ids in (out.input_ids[0], ref["input_ids"][0])]
        stamps = [re.findall(r"<[\d.]+ seconds>", text) for text in texts]
        assert stamps[0] == stamps[1] and bool(stamps[0]) == (family != "qwen2_5_vl")
        assert texts[0].count("<|video_pad|>") == texts[1].count("<|video_pad|>")


def test_without_pyav_the_error_names_the_package(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)  # makes `import av` raise ImportError
    # Importing the module needs no PyAV (it is imported when a file is read).
    spec = importlib.util.spec_from_file_location("video_io_without_av", video_io.__file__)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    path = tmp_path / "clip.mp4"
    path.write_bytes(b"\x00" * 64)
    tiny_checkpoint_assets.save(tmp_path / "assets", "qwen3_vl", vocab_size=600)
    with pytest.raises(ImportError, match=r"PyAV.*pip install 'qwenvl-jax\[video\]' \(or: pip install av\)"):
        Processor.from_pretrained(tmp_path / "assets")(_messages(str(path)))


@pytest.mark.parametrize("family", ["qwen3_vl"])
def test_bad_paths_give_clear_errors(tmp_path, family):
    tiny_checkpoint_assets.save(tmp_path / "assets", family, vocab_size=600)
    processor = Processor.from_pretrained(tmp_path / "assets")
    missing = tmp_path / "nowhere.mp4"
    with pytest.raises(ValueError, match=r"video 0: video file '.*nowhere\.mp4' does not exist"):
        processor(_messages(str(missing)))
    with pytest.raises(ValueError, match="video 0: .* is a directory, not a video file"):
        processor(_messages(tmp_path))
    with pytest.raises(ValueError, match="video 0: 'https://example.com/a.mp4' is a URL; this library never"):
        processor(_messages("https://example.com/a.mp4"))
    with pytest.raises(ValueError, match="video content part without a video"):
        processor([{"role": "user", "content": [{"type": "video"}]}])
    if importlib.util.find_spec("av") is not None:
        text = tmp_path / "notes.mp4"
        text.write_text("this is not a video\n" * 20)
        with pytest.raises(ValueError, match=r"video 0: cannot read video file '.*notes\.mp4'"):
            processor(_messages(str(text)))
