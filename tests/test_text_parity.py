"""Text-decoder logits against HF transformers, every family, two configs each, fp32 on the CPU."""

from __future__ import annotations

import numpy as np
import pytest

import qwenvl_jax as qj
from convert.converter import convert_checkpoint
from tests.hf_tiny import VARIANTS, build_hf_model

torch = pytest.importorskip("torch")

LENGTHS = (11, 6)  # two prompts of different lengths, batched with padding


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def pair(request, tmp_path_factory):
    """(HF model, our model loaded from a converted checkpoint) for one variant."""
    root = tmp_path_factory.mktemp(request.param)
    hf = build_hf_model(request.param, root / "hf")
    out = convert_checkpoint(root / "hf", root / "converted", dtype="float32", progress=False)
    return hf, qj.load(out)


def _batch(vocab: int, side: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    t = max(LENGTHS)
    ids = rng.integers(0, vocab, (len(LENGTHS), t))
    mask = np.zeros_like(ids)
    for row, n in enumerate(LENGTHS):
        if side == "left":
            mask[row, t - n :] = 1
        else:
            mask[row, :n] = 1
    return ids, mask


def _hf_logits(hf, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.float().numpy()


@pytest.mark.parametrize("side", ["left", "right"])
def test_logits_match_hf(pair, side):
    hf, ours = pair
    ids, mask = _batch(ours.config.text.vocab_size, side, seed=1 if side == "left" else 2)
    ref = _hf_logits(hf, ids, mask)
    got = ours.logits(ids, mask)
    real = mask.astype(bool)
    assert np.isfinite(got).all()
    err = np.abs(got - ref)[real].max() / np.abs(ref[real]).max()
    assert err < 1e-4, f"max |ours - HF| / max |HF| = {err:.2e}"
    assert not got[~real].any(), "padded positions must come back as zeros"


def test_padding_does_not_change_a_row(pair):
    """A row's logits are the same alone and inside a padded batch."""
    _, ours = pair
    ids, mask = _batch(ours.config.text.vocab_size, "left", seed=3)
    batched = ours.logits(ids, mask)
    n = LENGTHS[1]
    alone = ours.logits(ids[1:, -n:])
    np.testing.assert_allclose(batched[1, -n:], alone[0], rtol=1e-5, atol=1e-5)
