"""StreamingDetokenizer: deltas add up to tokenizer.decode, never split a character, decode only a window."""

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders
from tokenizers.models import BPE
from transformers import AutoTokenizer

from qwenvl_jax import tiny_checkpoint_assets
from qwenvl_jax.detokenize import StreamingDetokenizer

TEXT = ("Héllo wörld, naïve café — Ωμέγα! 😀👍🏽🇯🇵 日本語のテキスト、中文字符 한국어 <|im_end|>\n"
        "<think>ok</think> déjà vu 🧑‍💻 tschüß ñandú 1234567 done")


@pytest.fixture(scope="module")
def qwen_tokenizer(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tokenizer")
    tiny_checkpoint_assets.save(directory, "qwen3_vl")
    return AutoTokenizer.from_pretrained(directory)


def stream(detokenizer: StreamingDetokenizer, token_ids: list[int], chunk_sizes: list[int]) -> list[str]:
    deltas, start = [], 0
    for size in chunk_sizes:
        deltas.append(detokenizer.push(token_ids[start:start + size]))
        start += size
    assert start == len(token_ids)
    deltas.append(detokenizer.finish())
    return deltas


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_token_by_token_deltas_are_the_complete_prefix_of_the_decoded_text(qwen_tokenizer, skip_special_tokens):
    token_ids = qwen_tokenizer.encode(TEXT)
    assert any(len(qwen_tokenizer.decode([t])) and "\ufffd" in qwen_tokenizer.decode([t]) for t in token_ids)
    detokenizer = StreamingDetokenizer(qwen_tokenizer, skip_special_tokens=skip_special_tokens)
    emitted = ""
    for count, token_id in enumerate(token_ids, start=1):
        delta = detokenizer.push([token_id])
        assert "\ufffd" not in delta
        emitted += delta
        # Nothing complete is held back: the stream is exactly the decoded prefix minus an unfinished character.
        decoded = qwen_tokenizer.decode(token_ids[:count], skip_special_tokens=skip_special_tokens)
        assert emitted == decoded.rstrip("\ufffd")
    assert detokenizer.finish() == ""
    assert emitted == qwen_tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)
    assert ("<|im_end|>" in emitted) != skip_special_tokens


def test_chunked_pushes_add_up_to_decode(qwen_tokenizer):
    token_ids = qwen_tokenizer.encode(TEXT * 3)
    rng = np.random.default_rng(0)
    for _ in range(5):
        sizes = []
        while sum(sizes) < len(token_ids):
            sizes.append(min(int(rng.integers(0, 7)), len(token_ids) - sum(sizes)))
        deltas = stream(StreamingDetokenizer(qwen_tokenizer), token_ids, sizes)
        assert all("\ufffd" not in delta for delta in deltas)
        assert "".join(deltas) == qwen_tokenizer.decode(token_ids, skip_special_tokens=True)


def test_finish_flushes_a_character_cut_short(qwen_tokenizer):
    token_ids = qwen_tokenizer.encode("ok 😀")
    cut = token_ids[:-1]  # the emoji is four byte tokens; drop its last byte
    detokenizer = StreamingDetokenizer(qwen_tokenizer)
    streamed = "".join(detokenizer.push([t]) for t in cut)
    assert streamed == "ok "
    tail = detokenizer.finish()
    assert streamed + tail == qwen_tokenizer.decode(cut) and tail.endswith("\ufffd")


class CountingDecoder:
    """Records how many tokens each decode call sees."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.window_sizes: list[int] = []

    def decode(self, token_ids, skip_special_tokens=True):
        self.window_sizes.append(len(token_ids))
        return self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)


def test_each_push_decodes_a_short_window_not_the_whole_stream(qwen_tokenizer):
    token_ids = qwen_tokenizer.encode(TEXT * 20)
    assert len(token_ids) > 1000
    counting = CountingDecoder(qwen_tokenizer)
    detokenizer = StreamingDetokenizer(counting)
    text = "".join(detokenizer.push([t]) for t in token_ids) + detokenizer.finish()
    assert text == qwen_tokenizer.decode(token_ids, skip_special_tokens=True)
    # A window spans the previous complete stretch plus an unfinished character: a handful of byte tokens.
    assert max(counting.window_sizes) <= 12
    assert len(counting.window_sizes) <= 2 * len(token_ids) + 1


def test_decoder_that_strips_the_leading_space_of_a_decode():
    # SentencePiece-style: "▁" marks a space and the decoder strips one leading space from every decode, so
    # decoding a token alone loses the space between words; the left context window keeps it.
    vocab = {"<unk>": 0, "▁Hello": 1, "▁world": 2, "▁again": 3, **{f"<0x{b:02X}>": 4 + b for b in range(256)}}
    tokenizer = Tokenizer(BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                           decoders.Strip(" ", 1, 0)])
    token_ids = [1, 2, *(4 + b for b in "😀é".encode()), 3, 2]
    deltas = stream(StreamingDetokenizer(tokenizer), token_ids, [1] * len(token_ids))
    assert all("\ufffd" not in delta for delta in deltas)
    assert "".join(deltas) == tokenizer.decode(token_ids) == "Hello world😀é again world"
