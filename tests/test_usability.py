"""What a new user meets first: paths, checkpoints without tokenizer files, the README's example, limits, error
messages, and a quiet, fast command line."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import qwenvl_jax as qj
from convert.converter import convert_checkpoint, load_params, plan_conversion
from convert.safetensors_io import CheckpointError, shard_files
from qwenvl_jax.cli import main
from qwenvl_jax.processing import MissingFilesError, Processor, load_image
from qwenvl_jax.tiny_model import TINY_CONFIGS, write_tiny_checkpoint
from tests.compilations import compilations

ROOT = Path(__file__).resolve().parent.parent
MODEL_TYPE = "qwen3_vl"
IMAGE = np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)
MESSAGES = [{"role": "user", "content": [{"type": "image", "image": IMAGE}, {"type": "text", "text": "Describe."}]}]


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory) -> Path:
    """A complete tiny HF checkpoint: weights, config, tokenizer, chat template, processor configs."""
    hf_dir = tmp_path_factory.mktemp("tiny") / "hf"
    write_tiny_checkpoint(hf_dir, MODEL_TYPE)
    return hf_dir


@pytest.fixture(scope="module")
def converted(tiny_hf) -> Path:
    return convert_checkpoint(tiny_hf, tiny_hf.parent / "out", dtype="float32", progress=False)


# ------------------------------------------------------------------------------------------------ 1. paths


def test_relative_and_home_paths(tiny_hf, tmp_path, monkeypatch, capsys):
    """The README's flow, `qwenvl convert HF out && qwenvl generate out`, from the directory holding both."""
    shutil.copytree(tiny_hf, tmp_path / "hf")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    main(["convert", "hf", "out", "--dtype", "float32"])
    main(["generate", "out", "--prompt", "Hi.", "--max-new-tokens", "2", "--max-len", "64"])
    assert "2 new tokens" in capsys.readouterr().err
    model = qj.load("out")
    assert model.path.is_absolute() and model.path.samefile(tmp_path / "out")
    assert qj.load("~/out").dtype == np.dtype("float32")
    assert convert_checkpoint("~/hf", "~/out2", "float32", progress=False) == tmp_path / "out2"
    ids = np.array([[1, 2, 3]])
    np.testing.assert_array_equal(qj.load("~/out2").logits(ids), model.logits(ids))
    cfg, _ = load_params("hf")  # an HF directory, converted in memory
    assert cfg.model_type == MODEL_TYPE


def test_a_file_is_named_as_a_file(tiny_hf):
    config = tiny_hf / "config.json"
    for action in (lambda: convert_checkpoint(config, tiny_hf.parent / "never", progress=False),
                   lambda: qj.load(config)):
        with pytest.raises(CheckpointError, match=f"{re.escape(str(config))} is a file, not a directory"):
            action()
    with pytest.raises(CheckpointError, match="does not exist"):
        qj.load(tiny_hf.parent / "missing")


# ------------------------------------------------------------------------------- 2. no tokenizer or processor


@pytest.fixture(scope="module")
def model_only(tiny_hf, tmp_path_factory):
    """A checkpoint as the model's own save_pretrained writes it (config.json + weights), converted; its engine
    holds 64 tokens per request. Returns (model, the HF-named arrays of MESSAGES from the full checkpoint)."""
    hf_dir = tmp_path_factory.mktemp("model-only") / "hf"
    hf_dir.mkdir()
    for f in ["config.json", *(p.name for p in shard_files(tiny_hf))]:
        shutil.copy(tiny_hf / f, hf_dir / f)
    model = qj.load(convert_checkpoint(hf_dir, hf_dir.parent / "out", dtype="float32", progress=False))
    model.configure(max_len=64, decode_steps=4, vision_buckets=(64,))
    return model, Processor.from_pretrained(tiny_hf)(MESSAGES)


def test_token_ids_and_arrays_need_no_tokenizer_or_processor_files(model_only):
    model, inputs = model_only
    assert model.tokenizer is None
    config = json.loads((model.path / "config.json").read_text())
    assert model.eos_token_ids() == (config["text_config"]["eos_token_id"],)
    vision = dict(pixel_values=inputs.pixel_values, image_grid_thw=inputs.image_grid_thw)
    result = model.generate(input_ids=inputs.input_ids[0].tolist(), max_new_tokens=4, **vision)
    assert result.text is None and 1 <= len(result.token_ids) <= 4
    logits = model.logits(inputs.input_ids, **vision)
    assert int(logits[0, -1].argmax()) == result.token_ids[0]


def test_text_without_tokenizer_files_names_them_and_why(model_only):
    model, _ = model_only
    with pytest.raises(MissingFilesError, match=r"no tokenizer\.json .* and no preprocessor_config\.json, needed to "
                                                r"turn prompts, chat messages"):
        model.generate("Hello")
    ids = [1, 2, 3]
    with pytest.raises(MissingFilesError, match=r"no tokenizer\.json .*, needed to find stop strings"):
        model.generate(input_ids=ids, stop=["x"])
    with pytest.raises(MissingFilesError, match=r"no tokenizer\.json .*, needed to stream text deltas"):
        next(model.generate(input_ids=ids, stream=True))


def test_eos_ids_come_from_the_config_without_a_tokenizer(tiny_hf, tmp_path):
    hf_dir = tmp_path / "hf"
    shutil.copytree(tiny_hf, hf_dir)
    model = qj.load(hf_dir, dtype="float32")
    config = json.loads((hf_dir / "config.json").read_text())
    # HF writes the top-level key as null when only text_config holds the ids.
    (hf_dir / "config.json").write_text(json.dumps(dict(config, eos_token_id=None)))
    (hf_dir / "tokenizer.json").unlink()
    assert model.eos_token_ids() == (config["text_config"]["eos_token_id"],)


# ----------------------------------------------------------------------------------------------- 4. limits


def test_prompt_past_max_len_is_reported(model_only):
    model, _ = model_only
    assert model.engine().config.prompt_buckets == (64,)  # the defaults, clipped to max_len=64
    with pytest.warns(UserWarning, match="max_len of 64 tokens: its 60 prompt tokens left room for 4 of "
                                         "max_new_tokens=10"):
        cut = model.generate(input_ids=list(range(1, 61)), max_new_tokens=10)
    assert cut.finish_reason == "length" and len(cut.token_ids) == 4 and cut.stats.truncated_by_max_len
    fits = model.generate(input_ids=list(range(1, 61)), max_new_tokens=3)
    assert fits.finish_reason == "length" and not fits.stats.truncated_by_max_len


def test_empty_input_ids_are_named(model_only):
    model, _ = model_only
    with pytest.raises(ValueError, match="input_ids is empty"):
        model.generate(input_ids=[])
    with pytest.raises(ValueError, match=r"input_ids row\(s\) \[1\] hold no tokens"):
        model.generate(input_ids=[[1, 2], []])


def test_a_decode_state_past_device_memory_names_its_size_and_the_remedy(converted):
    model = qj.load(converted)
    model.configure(max_len=2**30)  # each attention layer's keys: 2 slots x 2^30 tokens x 256 B
    with pytest.raises(MemoryError, match=r"decode state of max_batch=1 slots .* max_len=1073741824 tokens "
                                          r"\(\d+\.\d\d GiB\) does not fit.*Lower max_batch or max_len"):
        model.engine()


def test_token_ids_end_at_the_stop_string(converted):
    model = qj.load(converted)
    model.configure(max_len=64, vision_buckets=(64,))
    full = model.generate("Say something.", max_new_tokens=16)

    def decode(ids: list[int]) -> str:
        return model.tokenizer.decode(ids, skip_special_tokens=True)

    stop = re.search(r"[a-z]{2}", full.text)[0]  # random weights: letters amid broken bytes
    stopped = model.generate("Say something.", max_new_tokens=16, stop=[stop])
    assert stopped.finish_reason == "stop" and stopped.text == full.text[: full.text.index(stop)]
    assert stopped.token_ids == full.token_ids[: len(stopped.token_ids)]
    assert stop in decode(stopped.token_ids) and stop not in decode(stopped.token_ids[:-1])
    assert decode(stopped.token_ids).startswith(stopped.text)
    assert stopped.stats.new_tokens == len(stopped.token_ids)


def test_a_stream_sees_the_pixels_of_its_call_after_the_caller_reuses_the_array(converted):
    """A stream prefills when first iterated; the pixel array is not copied on the way to the engine, except
    for a stream, whose caller may write over the array before then."""
    model = qj.load(converted)
    model.configure(max_len=64, vision_buckets=(64,))
    inputs = model.processor(MESSAGES)
    pixels = np.array(inputs.pixel_values)
    call = dict(input_ids=inputs.input_ids[0].tolist(), image_grid_thw=inputs.image_grid_thw, max_new_tokens=6)
    want = model.generate(pixel_values=pixels, **call)
    stream = model.generate(pixel_values=pixels, stream=True, **call)
    pixels[:] = 0
    while True:
        try:
            next(stream)
        except StopIteration as done:
            assert done.value.token_ids == want.token_ids
            break
    assert model.generate(pixel_values=pixels, **call).token_ids != want.token_ids  # the pixels do matter


def test_the_first_images_after_warmup_compile_nothing(converted):
    """Warm-up compiles every program an image of a warmed bucket needs, eager ops included: the request path
    made the tower's rotary tables as well (unused there), whose eager ops compiled at the first image; and
    warm-up's frames were 2 patches high, so an image filling a bucket past 256 patches (wider tables) compiled
    the tower again."""
    import jax

    from qwenvl_jax.models import vision

    jax.clear_caches()
    vision._rotary_tables.cache_clear()  # as in a fresh process
    model = qj.load(converted)
    model.configure(max_len=192, prompt_buckets=(160,), vision_buckets=(64, 512))
    model.engine().warmup(progress=False)
    cfg = model.config
    text = list(range(3, 10))
    ids = text + [cfg.vision_start_token_id] + [cfg.image_token_id] * (16 * 32 // 4) + [cfg.vision_end_token_id]
    square = dict(input_ids=ids + text, image_grid_thw=np.array([[1, 16, 32]]),
                  pixel_values=np.random.default_rng(0).standard_normal((512, cfg.vision.patch_dim), np.float32))
    with compilations() as compiles:
        model.generate(MESSAGES, max_new_tokens=2)
        model.generate(max_new_tokens=2, **square)
    assert compiles.count == 0


def test_corrupt_shard_reports_real_sizes(tmp_path, tiny_hf):
    hf_dir = tmp_path / "hf"
    shutil.copytree(tiny_hf, hf_dir)
    shard = shard_files(hf_dir)[0]
    size = shard.stat().st_size // 2
    shard.write_bytes(shard.read_bytes()[:size])
    with pytest.raises(CheckpointError) as err:
        plan_conversion(hf_dir)
    message = str(err.value)
    assert f"but the file has {size} bytes" in message and "truncated" in message, message
    assert not re.search(r"has (\d+) bytes .* needs \1\b", message), message


def test_cli_and_library_share_the_default_max_len(converted, capsys, monkeypatch):
    from qwenvl_jax.engine import EngineConfig

    monkeypatch.setattr("builtins.input", lambda prompt="": "")
    main(["chat", str(converted)])
    assert f"for max_len {EngineConfig().max_len};" in capsys.readouterr().err


def test_chat_reports_a_bad_image_when_typed(converted, capsys, monkeypatch):
    lines = iter(["/image no-such-cat.jpg", ""])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    main(["chat", str(converted), "--max-len", "64"])
    err = capsys.readouterr().err
    assert "error: image 0: cannot read image file 'no-such-cat.jpg'" in err


# ------------------------------------------------------------------------------------------ 3. the README


def test_readme_python_example_runs(converted, tmp_path, capsys):
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    assert len(blocks) == 1, "the README has one Python example, run here"
    image = tmp_path / "cat.jpg"
    Image.fromarray(IMAGE).save(image)
    code = blocks[0].replace('"OUT_DIR"', repr(str(converted))).replace('"cat.jpg"', repr(str(image)))
    assert code != blocks[0] and str(image) in code
    exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("0 '") for line in lines) and any(line.startswith("1 '") for line in lines)


# ------------------------------------------------------------------------------------ 5. quiet, fast start


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env})


def test_help_and_path_errors_import_neither_jax_nor_transformers(tmp_path):
    """`qwenvl --help` and errors about the arguments must not wait seconds for jax, transformers or torch."""
    not_a_dir = tmp_path / "model.safetensors"
    not_a_dir.write_bytes(b"")
    code = f"""
import sys
from qwenvl_jax.cli import main
for argv in (["--help"], ["generate", "/no/such/dir", "--prompt", "x"], ["convert", {str(not_a_dir)!r}, "out"],
             ["generate", {str(tmp_path)!r}, "--prompt", "x", "--image", "no-such.png"]):
    try:
        main(argv)
    except SystemExit as e:
        print(e.code)
print(sorted(m for m in ("jax", "transformers", "torch", "flax", "orbax") if m in sys.modules))
"""
    run = _python(code)
    lines = run.stdout.strip().splitlines()
    assert run.returncode == 0, run.stderr
    assert lines[-1] == "[]", f"imported: {lines[-1]}"
    assert "checkpoint directory /no/such/dir does not exist" in run.stdout
    assert f"{not_a_dir} is a file, not a directory" in run.stdout
    assert "--image no-such.png does not exist" in run.stdout


def test_no_torch_notice_without_torch():
    """Without torch, transformers announces at import that PyTorch is absent; we never need it."""
    code = """
import importlib.util, sys
find_spec = importlib.util.find_spec
importlib.util.find_spec = lambda name, package=None: (None if name.split(".")[0] == "torch"
                                                       else find_spec(name, package))
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "torch":
            raise ModuleNotFoundError(name)
sys.meta_path.insert(0, NoTorch())
import qwenvl_jax.processing
import transformers
print(transformers.utils.is_torch_available())
"""
    run = _python(code)
    assert run.returncode == 0 and run.stdout.strip() == "False", run.stderr
    assert "PyTorch was not found" not in run.stderr, run.stderr


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_tiny_checkpoints_hold_no_out_of_vocabulary_ids(tmp_path, model_type):
    """transformers warns about every special id outside the vocabulary whenever it reads such a config."""
    write_tiny_checkpoint(tmp_path, model_type)
    config = json.loads((tmp_path / "config.json").read_text())
    vocab = config["text_config"]["vocab_size"]
    ids = {f"{scope}{k}": v for scope, d in (("", config), ("text_config.", config["text_config"]))
           for k, v in d.items() if k.endswith("_token_id") and isinstance(v, int)}
    assert ids and all(0 <= v < vocab for v in ids.values()), ids


def test_images_load_without_deprecation_chatter(caplog):
    from transformers.utils import logging as hf_logging

    hf_logging.warning_once.cache_clear()  # a warning shown earlier in this process would hide a new one
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("transformers").addHandler(handler)
    try:
        array = load_image(Image.fromarray(IMAGE), 0)
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    np.testing.assert_array_equal(array, IMAGE)
    assert not [r.getMessage() for r in records]


def test_setup_skips_pip_when_nothing_changed(tmp_path):
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "setup.sh", tmp_path / "scripts")
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    log = tmp_path / "pip.log"
    fake = tmp_path / ".venv" / "bin" / "python"
    fake.parent.mkdir(parents=True)
    fake.write_text(f'#!/bin/bash\nif [ "$1 $2" = "-m pip" ]; then echo "$@" >> {log}; exit 0; fi\n'
                    f'exec {sys.executable} "$@"\n')
    fake.chmod(0o755)

    def installs(*extras: str) -> int:
        subprocess.run(["bash", str(tmp_path / "scripts" / "setup.sh"), *extras], check=True, timeout=60)
        return sum("install -q -e" in line for line in log.read_text().splitlines()) if log.exists() else 0

    assert installs("test") == 1
    assert installs("test") == 1  # unchanged: no pip at all
    assert installs() == 2  # other extras
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'x'\nversion = '2'\n")
    assert installs("test") == 3 and installs() == 4 and installs() == 4
