"""The qwenvl command line: convert, generate (text and image), chat with history."""

from __future__ import annotations

import numpy as np
from PIL import Image

from qwenvl_jax.cli import main
from qwenvl_jax.tiny_model import write_tiny_checkpoint


def test_convert_generate_and_chat(tmp_path, capsys, monkeypatch):
    write_tiny_checkpoint(tmp_path / "hf", "qwen3_vl")
    main(["convert", str(tmp_path / "hf"), str(tmp_path / "model"), "--dtype", "float32"])
    image = tmp_path / "x.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(image)
    common = ["--max-new-tokens", "5", "--max-len", "128", "--decode-steps", "4"]
    main(["generate", str(tmp_path / "model"), "--prompt", "Describe.", "--image", str(image), *common])
    out = capsys.readouterr()
    assert "converted" in out.out and "5 new tokens" in out.err and "decode state" in out.err

    lines = iter(["Hello", "And again", ""])
    prompts = []
    monkeypatch.setattr("builtins.input", lambda prompt="": (prompts.append(prompt), next(lines))[1])
    main(["chat", str(tmp_path / "model"), *common])
    assert prompts == ["> "] * 3
    out = capsys.readouterr().out
    assert len([line for line in out.splitlines() if line]) == 2  # one streamed reply per message
