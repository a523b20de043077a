"""Offline tokenizer + processor files for tiny test/demo checkpoints.

``save(dir, family, ...)`` writes a small byte-level BPE tokenizer carrying Qwen's special tokens, the family's
real chat template and its image/video processor configs with small pixel limits, so that both
``transformers.AutoProcessor.from_pretrained(dir)`` and ``qwenvl_jax.processing.Processor.from_pretrained(dir)``
load it. Nothing is downloaded: the BPE merges are generated, not trained on a corpus.
"""

from __future__ import annotations

import json
import string
from collections.abc import Mapping
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

from qwenvl_jax.config import Family

# Qwen's special tokens in the order the real tokenizers number them (151643 onwards).
QWEN2_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
    "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
)
QWEN3_EXTRA_TOKENS: tuple[str, ...] = ("<tool_response>", "</tool_response>", "<think>", "</think>")
# Tool-call and thinking markers are ordinary (non-special) added tokens in the real tokenizers.
_NOT_SPECIAL = {"<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>"}

# Qwen2's pre-tokenisation split (tokenization_qwen2.PRETOKENIZE_REGEX).
_PRETOKENIZE_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
                      r"""\s*[\r\n]+|\s+(?!\S)|\s+""")

# Hub chat templates. Qwen2.5-VL: chat_template.json of Qwen/Qwen2.5-VL-7B-Instruct.
QWEN2_5_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content "
    "%}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)

# Qwen3-VL: chat_template.json of Qwen/Qwen3-VL-2B-Instruct (also used here for Qwen3.5, which shares the
# vision placeholders; Qwen3.5's own template adds thinking blocks that the tiny assets do not need).
QWEN3_VL_CHAT_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
        {%- if messages[0].content is string %}
            {{- messages[0].content }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '\\n\\n' }}
    {%- endif %}
    {{- "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\\n' }}
        {%- if messages[0].content is string %}
            {{- messages[0].content }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- set image_count = namespace(value=0) %}
{%- set video_count = namespace(value=0) %}
{%- for message in messages %}
    {%- if message.role == "user" %}
        {{- '<|im_start|>' + message.role + '\\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content in message.content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {%- set image_count.value = image_count.value + 1 %}
                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                    <|vision_start|><|image_pad|><|vision_end|>
                {%- elif content.type == 'video' or 'video' in content %}
                    {%- set video_count.value = video_count.value + 1 %}
                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                    <|vision_start|><|video_pad|><|vision_end|>
                {%- elif 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role + '\\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content_item in message.content %}
                {%- if 'text' in content_item %}
                    {{- content_item.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and message.content) or (not loop.first) %}
                    {{- '\\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content in message.content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {%- set image_count.value = image_count.value + 1 %}
                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                    <|vision_start|><|image_pad|><|vision_end|>
                {%- elif content.type == 'video' or 'video' in content %}
                    {%- set video_count.value = video_count.value + 1 %}
                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                    <|vision_start|><|video_pad|><|vision_end|>
                {%- elif 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HALF = (0.5, 0.5, 0.5)

_PROCESSOR_CLASS = {"qwen2_5_vl": "Qwen2_5_VLProcessor", "qwen3_vl": "Qwen3VLProcessor", "qwen3_5": "Qwen3VLProcessor"}
_DEFAULT_PATCH_SIZE = {"qwen2_5_vl": 14, "qwen3_vl": 16, "qwen3_5": 16}


def special_tokens(family: Family) -> tuple[str, ...]:
    return QWEN2_SPECIAL_TOKENS if family == "qwen2_5_vl" else QWEN2_SPECIAL_TOKENS + QWEN3_EXTRA_TOKENS


def special_token_ids(family: Family, vocab_size: int, first_special_id: int | None = None) -> dict[str, int]:
    """Id of every special token. They form one block in Qwen's order starting at ``first_special_id``
    (default: the block ends at ``vocab_size - 1``, as in the real tokenizers); regular tokens take the ids below.
    A contiguous layout is what HF's tokenizer loader keeps: it renumbers regular tokens placed above or
    between added tokens."""
    names = special_tokens(family)
    first = vocab_size - len(names) if first_special_id is None else first_special_id
    if first < 0 or first + len(names) > vocab_size:
        raise ValueError(f"{len(names)} special tokens from id {first} do not fit in vocab_size {vocab_size}")
    return {name: first + k for k, name in enumerate(names)}


def _generated_merges(count: int) -> list[tuple[str, str]]:
    """Deterministic merges that make common English pieces single tokens: space+letter, letter pairs,
    space+letter pair, digit pairs: at most 972 merges, i.e. 1228 regular tokens reachable by encoding."""
    space = "Ġ"  # byte-level encoding of " "
    lower, upper = string.ascii_lowercase, string.ascii_uppercase
    frequent = "etaoinshrdlcumwfgypbvkjxqz"  # English letter frequency: most useful pairs first
    candidates: list[tuple[str, str]] = [(space, c) for c in lower + upper]
    candidates += [(a, b) for a in frequent for b in frequent]
    candidates += [(space + a, b) for a in frequent[:12] for b in frequent[:12]]
    candidates += [(a, b) for a in string.digits for b in string.digits]
    return candidates[:count]


def _decode_only_pieces(count: int) -> list[str]:
    """Regular tokens past the merges (a released model's vocabulary size, e.g. 248320 for a benchmark serving
    random weights): " " + four lowercase letters each, which no merge produces, so every id decodes to text."""
    letters = string.ascii_lowercase
    return ["Ġ" + "".join(letters[i // 26**k % 26] for k in range(4)) for i in range(count)]


def build_tokenizer(special_ids: Mapping[str, int]) -> Tokenizer:
    """Byte-level BPE with Qwen2's pre-tokenizer: regular tokens fill ``[0, min(special ids))`` (those past the
    generated merges only decode), then the special tokens follow in id order."""
    n_regular = min(special_ids.values())
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    if n_regular < len(alphabet):
        raise ValueError(f"special tokens start at id {n_regular}; the byte-level alphabet alone needs "
                         f"{len(alphabet)} ids below them")
    merges = _generated_merges(n_regular - len(alphabet))
    pieces = alphabet + [a + b for a, b in merges]
    vocab = {piece: i for i, piece in enumerate(pieces + _decode_only_pieces(n_regular - len(pieces)))}
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token=None, continuing_subword_prefix="",
                        end_of_word_suffix="", fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    for name, i in sorted(special_ids.items(), key=lambda kv: kv[1]):
        tok.add_tokens([AddedToken(name, special=name not in _NOT_SPECIAL, normalized=False)])
        if tok.token_to_id(name) != i:
            raise AssertionError(f"{name} got id {tok.token_to_id(name)}, wanted {i}")
    return tok


def processor_configs(family: Family, patch_size: int | None = None, merge_size: int = 2,
                      temporal_patch_size: int = 2, min_pixels: int | None = None, max_pixels: int | None = None,
                      video_min_pixels: int | None = None, video_max_pixels: int | None = None,
                      fps: float = 2.0, min_frames: int = 4, max_frames: int = 16) -> tuple[dict, dict]:
    """(preprocessor_config.json, video_preprocessor_config.json) in the hub layout of each family, with small
    pixel limits: by default an image covers 4..64 merge windows (16..256 patches); a Qwen2.5-VL video frame the
    same, a Qwen3-VL / Qwen3.5 video 4..256 merge windows summed over its frames."""
    patch_size = patch_size or _DEFAULT_PATCH_SIZE[family]
    factor = patch_size * merge_size
    min_pixels = min_pixels or 4 * factor * factor
    max_pixels = max_pixels or 64 * factor * factor
    processor_class = _PROCESSOR_CLASS[family]
    common = dict(patch_size=patch_size, temporal_patch_size=temporal_patch_size, merge_size=merge_size,
                  do_resize=True, do_rescale=True, rescale_factor=1 / 255, do_normalize=True, do_convert_rgb=True,
                  resample=3, processor_class=processor_class)
    if family == "qwen2_5_vl":
        image = dict(common, min_pixels=min_pixels, max_pixels=max_pixels,
                     size={"shortest_edge": min_pixels, "longest_edge": max_pixels},
                     image_mean=list(OPENAI_CLIP_MEAN), image_std=list(OPENAI_CLIP_STD),
                     image_processor_type="Qwen2VLImageProcessor")
        video_min = video_min_pixels or min_pixels
        video_max = video_max_pixels or max_pixels
        video = dict(common, size={"shortest_edge": video_min, "longest_edge": video_max},
                     image_mean=list(OPENAI_CLIP_MEAN), image_std=list(OPENAI_CLIP_STD),
                     min_frames=min_frames, max_frames=max_frames, fps=fps, do_sample_frames=False,
                     video_processor_type="Qwen2VLVideoProcessor")
    else:
        image = dict(common, size={"shortest_edge": min_pixels, "longest_edge": max_pixels},
                     image_mean=list(HALF), image_std=list(HALF), image_processor_type="Qwen2VLImageProcessor")
        # Qwen3-VL's video limits count pixels over all frames (t * h * w).
        video_min = video_min_pixels or 4 * factor * factor
        video_max = video_max_pixels or 256 * factor * factor
        video = dict(common, size={"shortest_edge": video_min, "longest_edge": video_max},
                     image_mean=list(HALF), image_std=list(HALF), min_frames=min_frames, max_frames=max_frames,
                     fps=fps, do_sample_frames=True, video_processor_type="Qwen3VLVideoProcessor")
    return image, video


def save(directory: str | Path, family: Family, *, vocab_size: int = 1024, first_special_id: int | None = None,
         **processor_kwargs) -> dict[str, int]:
    """Writes tokenizer.json, tokenizer_config.json, chat_template.jinja, preprocessor_config.json and
    video_preprocessor_config.json into ``directory``; returns the special token ids (put ``<|image_pad|>``,
    ``<|video_pad|>``, ``<|vision_start|>`` and ``<|vision_end|>`` into the tiny model's config.json).
    ``processor_kwargs`` go to :func:`processor_configs` (patch_size, merge_size, min_pixels, ...)."""
    if family not in _PROCESSOR_CLASS:
        raise ValueError(f"unknown family {family!r}; one of {sorted(_PROCESSOR_CLASS)}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    ids = special_token_ids(family, vocab_size, first_special_id)
    build_tokenizer(ids).save(str(directory / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "model_max_length": 32768,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "bos_token": None,
        "errors": "replace",
        "split_special_tokens": False,
        "clean_up_tokenization_spaces": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(i): {"content": name, "special": name not in _NOT_SPECIAL, "lstrip": False, "rstrip": False,
                     "normalized": False, "single_word": False}
            for name, i in ids.items()
        },
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=1))
    template = QWEN2_5_VL_CHAT_TEMPLATE if family == "qwen2_5_vl" else QWEN3_VL_CHAT_TEMPLATE
    (directory / "chat_template.jinja").write_text(template)
    image_cfg, video_cfg = processor_configs(family, **processor_kwargs)
    (directory / "preprocessor_config.json").write_text(json.dumps(image_cfg, indent=1))
    (directory / "video_preprocessor_config.json").write_text(json.dumps(video_cfg, indent=1))
    return ids
