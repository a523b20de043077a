"""The OpenAI API's request bodies, checked (pydantic) and turned into engine requests; OpenAI-style errors.

Sampling follows OpenAI's fields (``temperature``, ``top_p``, ``max_tokens``, ``stop``, ``seed``, ``n``) plus
vLLM's ``top_k`` (-1 or 0: off), ``min_p`` and ``repetition_penalty``; fields left out take the checkpoint's
``generation_config.json`` values where it has them, else OpenAI's defaults. Fields this server cannot honour
(tools, log-probabilities, presence/frequency penalties, ...) are refused by name rather than ignored.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from qwenvl_jax.engine import Request
from qwenvl_jax.generate import GenerationModel, build_requests
from qwenvl_jax.sampling import SamplingParams

MAX_N = 16  # choices per request
_SAMPLING_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0}


class ApiError(Exception):
    """An error the client gets as OpenAI's JSON: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class _Body(BaseModel):
    """Fields both endpoints share."""

    model_config = ConfigDict(extra="allow")  # clients send fields we have no use for (user, metadata, ...)

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = Field(None, ge=0, lt=2**64)
    n: int = Field(1, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None

    def refuse_unsupported(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise ApiError(400, f"{name} is not supported; use repetition_penalty", param=name)
        if self.logit_bias:
            raise ApiError(400, "logit_bias is not supported", param="logit_bias")

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))

    @property
    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class ChatBody(_Body):
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name for max_tokens
    logprobs: bool | None = None
    tools: list | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.logprobs:
            raise ApiError(400, "logprobs are not supported", param="logprobs")
        if self.tools or self.tool_choice not in (None, "none"):
            raise ApiError(400, "tools and tool_choice are not supported", param="tools")
        if self.response_format and self.response_format.get("type") != "text":
            raise ApiError(400, "response_format other than {'type': 'text'} is not supported",
                           param="response_format")


class CompletionBody(_Body):
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for completions (chat: the rest of the context)
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    suffix: str | None = None
    logprobs: int | None = None
    best_of: int | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        for name in ("echo", "suffix", "logprobs"):
            if getattr(self, name):
                raise ApiError(400, f"{name} is not supported", param=name)
        if self.best_of not in (None, self.n):
            raise ApiError(400, "best_of other than n is not supported", param="best_of")


def parse_body(raw: bytes, kind: type[_Body]) -> _Body:
    """The checked body: ApiError 400 naming the problem for bad JSON, a bad field, an unsupported feature."""
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        body = kind.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ApiError(400, f"{where}: {first['msg']}", param=where) from e
    body.refuse_unsupported()
    return body


def generation_defaults(path: Path) -> dict[str, float]:
    """Sampling defaults: OpenAI's, overridden by the checkpoint's generation_config.json (as vLLM does)."""
    f = path / "generation_config.json"
    config = json.loads(f.read_text()) if f.is_file() else {}
    return {k: config.get(k, v) if config.get(k) is not None else v for k, v in _SAMPLING_DEFAULTS.items()}


def sampling_params(body: _Body, defaults: dict[str, float]) -> list[SamplingParams]:
    """One SamplingParams per choice; with a seed, choice i samples with seed + i (distinct choices, repeatable)."""
    given = {k: getattr(body, k) for k in _SAMPLING_DEFAULTS if getattr(body, k) is not None}
    values = {**defaults, **given}
    if values["top_k"] == -1:  # vLLM's "off"
        values["top_k"] = 0
    try:
        return [SamplingParams(**values, seed=None if body.seed is None else (body.seed + i) % 2**64)
                for i in range(body.n)]
    except ValueError as e:
        raise ApiError(400, str(e), param=str(e).split()[0]) from e


def _content_part(part: Any) -> dict:
    """An OpenAI content part -> the processor's: text, or an image from a data URL or a local path."""
    if not isinstance(part, dict):
        raise ApiError(400, f"a content part must be an object, got {part!r:.100}", param="messages")
    kind = part.get("type")
    if kind == "text":
        if not isinstance(part.get("text"), str):
            raise ApiError(400, "a text content part needs a string 'text'", param="messages")
        return {"type": "text", "text": part["text"]}
    if kind == "image_url":
        image = part.get("image_url")
        url = image.get("url") if isinstance(image, dict) else image
        if not isinstance(url, str) or not url:
            raise ApiError(400, "an image_url content part needs image_url.url", param="messages")
        if url.startswith(("http://", "https://")):
            raise ApiError(400, "remote image URLs are not fetched (this server does not reach the network): send "
                                "the image as a base64 data URL (data:image/png;base64,...) or a local file path",
                           param="messages")
        return {"type": "image", "image": url}
    raise ApiError(400, f"content part type {kind!r} is not supported (text and image_url are)", param="messages")


def chat_messages(messages: list[dict[str, Any]]) -> list[dict]:
    """OpenAI chat messages -> the processor's (content parts as the chat template reads them)."""
    out = []
    for message in messages:
        role, content = message.get("role"), message.get("content")
        if role == "developer":  # OpenAI's newer name for the system role
            role = "system"
        if role not in ("system", "user", "assistant"):
            raise ApiError(400, f"message role {role!r} is not supported (system, user, assistant are)",
                           param="messages")
        if isinstance(content, list):
            content = [_content_part(p) for p in content]
        elif not isinstance(content, str):
            raise ApiError(400, f"a {role} message needs content: a string or a list of content parts",
                           param="messages")
        out.append({"role": role, "content": content})
    return out


Prompt = list[dict] | list[int]  # chat messages, or a completion prompt's token ids


def engine_requests(model: GenerationModel, prompt: Prompt, body: _Body, sampling: list[SamplingParams]
                    ) -> list[Request]:
    """One request per choice (host preprocessing once). ``max_tokens`` left out: the rest of the context."""
    try:
        if prompt and isinstance(prompt[0], dict):
            (request,), _ = build_requests(model, prompt, images=None, videos=None, input_ids=None,
                                           vision_arrays={}, sampling=sampling[0], max_new_tokens=1)
        else:
            (request,), _ = build_requests(model, None, images=None, videos=None, input_ids=prompt,
                                           vision_arrays={}, sampling=sampling[0], max_new_tokens=1)
    except ValueError as e:  # a corrupt image, an empty prompt, ...
        raise ApiError(400, str(e)) from e
    max_len = model.engine().config.max_len
    tokens = len(request.input_ids)
    max_tokens = body.max_tokens or getattr(body, "max_completion_tokens", None)
    if tokens + (max_tokens or 1) > max_len:
        asked = f" + {max_tokens} (max_tokens)" if max_tokens else " + at least 1 new token"
        raise ApiError(400, f"the context holds {max_len} tokens, but the prompt has {tokens}{asked}; shorten the "
                            "prompt or lower max_tokens", param="messages" if isinstance(body, ChatBody) else "prompt",
                       code="context_length_exceeded")
    request = dataclasses.replace(request, max_new_tokens=max_tokens or max_len - tokens)
    return [dataclasses.replace(request, sampling=s) for s in sampling]


def completion_prompts(body: CompletionBody, tokenizer: Any) -> list[list[int]]:
    """The token ids of each prompt of a completion request (a string, strings, token ids, or lists of them)."""
    prompt = body.prompt
    rows = [prompt] if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)) else list(prompt)
    if not rows:
        raise ApiError(400, "prompt is empty", param="prompt")
    return [tokenizer.encode(row) if isinstance(row, str) else list(row) for row in rows]

