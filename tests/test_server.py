"""`qwenvl serve`, the real server process on 127.0.0.1 over a tiny random checkpoint: the official openai client
with an image (streamed and whole), 32 concurrent streams that each get their tokens alone, cancellation and
backpressure, OpenAI-style errors for bad input, the other endpoints, and a clean exit on SIGTERM.

One server serves the module (its programs compile on first use, so each test reuses what earlier ones compiled);
the SIGTERM test stops it and runs last."""

from __future__ import annotations

import asyncio
import base64
import http.client
import io
import json
import signal
import socket
import subprocess
import sys
import time
import urllib.parse

import numpy as np
import pytest
from PIL import Image

openai = pytest.importorskip("openai")

from qwenvl_jax.tiny_model import write_tiny_checkpoint  # noqa: E402

NAME = "tiny"
MAX_BATCH, MAX_QUEUE, MAX_LEN = 4, 28, 512
IMAGE = np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _request(url: str, method: str, path: str, body: bytes | dict | None = None) -> http.client.HTTPResponse:
    """The response, its headers read (a stream's body still to come); ``dict`` bodies go as JSON."""
    address = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=60)
    raw = json.dumps(body).encode() if isinstance(body, dict) else body
    connection.request(method, path, raw, {"Content-Type": "application/json"} if raw is not None else {})
    return connection.getresponse()


def _get(url: str, path: str) -> tuple[int, str]:
    response = _request(url, "GET", path)
    return response.status, response.read().decode()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(base URL, the server process, its log file)."""
    work = tmp_path_factory.mktemp("serve")
    write_tiny_checkpoint(work / "hf", "qwen3_vl")
    port = _free_port()
    log = work / "server.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "qwenvl_jax.cli", "serve", str(work / "hf"), "--dtype", "float32", "--port",
             str(port), "--served-model-name", NAME, "--max-batch", str(MAX_BATCH), "--max-queue", str(MAX_QUEUE),
             "--max-len", str(MAX_LEN), "--decode-steps", "4", "--shutdown-timeout", "20"],
            stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        assert process.poll() is None, log.read_text()
        try:
            if _get(url, "/health")[0] == 200:
                break
        except ConnectionError:
            pass
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.2)
    yield url, process, log
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        process.wait(30)


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


def _data_url(array: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _ask(text: str, image_url: str | None = None) -> list[dict]:
    image = [{"type": "image_url", "image_url": {"url": image_url}}] if image_url else []
    return [{"role": "user", "content": image + [{"type": "text", "text": text}]}]


def _metrics(url: str) -> dict[str, float]:
    lines = _get(url, "/metrics")[1].splitlines()
    return {name: float(value) for name, value in (line.rsplit(" ", 1) for line in lines if not line.startswith("#"))}


def _counts(usage) -> tuple[int, int, int]:
    return usage.prompt_tokens, usage.completion_tokens, usage.total_tokens


def test_openai_client_chat_with_an_image_whole_and_streamed(server, tmp_path):
    url, _, _ = server
    client = _client(url)
    path = tmp_path / "cat.png"
    Image.fromarray(IMAGE).save(path)
    whole = client.chat.completions.create(model=NAME, messages=_ask("Describe.", _data_url(IMAGE)), max_tokens=6,
                                           temperature=0)
    text = whole.choices[0].message.content
    assert whole.choices[0].finish_reason in ("stop", "length") and text
    assert whole.usage.prompt_tokens > 20 and 1 <= whole.usage.completion_tokens <= 6  # the image's tokens count
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens

    from_path = client.chat.completions.create(model=NAME, messages=_ask("Describe.", str(path)), max_tokens=6,
                                               temperature=0)
    assert from_path.choices[0].message.content == text and _counts(from_path.usage) == _counts(whole.usage)
    # The same conversation again: the prefix cache held all of it but the last token (qwen3_vl: attention only).
    assert whole.usage.prompt_tokens_details.cached_tokens == 0
    assert from_path.usage.prompt_tokens_details.cached_tokens == whole.usage.prompt_tokens - 1

    for include_usage in (True, False):
        chunks = list(client.chat.completions.create(
            model=NAME, messages=_ask("Describe.", str(path)), max_tokens=6, temperature=0, stream=True,
            stream_options={"include_usage": include_usage}))
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert streamed == text
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
        usage = [c.usage for c in chunks if c.usage]
        # once: in its own last chunk (include_usage) or with the last choice's end
        assert [_counts(u) for u in usage] == [_counts(whole.usage)]
        assert (chunks[-1].choices == []) == include_usage


def test_32_concurrent_streams_each_get_the_tokens_they_get_alone(server):
    url, _, _ = server
    prompts = [f"Tell me about the number {i}{' please' * (i % 5)}." for i in range(32)]
    client = _client(url)
    alone = [client.chat.completions.create(model=NAME, messages=_ask(p), max_tokens=5, temperature=0)
             for p in prompts]

    async def stream(aclient: openai.AsyncOpenAI, prompt: str) -> tuple[str, str, int]:
        parts, reason, usage = [], None, None
        async for chunk in await aclient.chat.completions.create(model=NAME, messages=_ask(prompt), max_tokens=5,
                                                                 temperature=0, stream=True):
            if chunk.choices:
                parts.append(chunk.choices[0].delta.content or "")
                reason = chunk.choices[0].finish_reason or reason
            usage = chunk.usage or usage
        return "".join(parts), reason, usage.completion_tokens

    async def together() -> list[tuple[str, str, int]]:
        aclient = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        return await asyncio.gather(*(stream(aclient, p) for p in prompts))

    got = asyncio.run(together())
    assert got == [(r.choices[0].message.content, r.choices[0].finish_reason, r.usage.completion_tokens)
                   for r in alone]


def test_a_full_queue_answers_429_and_cancelled_streams_free_their_slots(server):
    url, _, _ = server
    body = {"model": NAME, "messages": _ask("Go on and on."), "max_tokens": MAX_LEN - 40, "temperature": 0,
            "stream": True}
    # Long requests fill the slots (each has sent content), then the queue fills behind them.
    running = [_request(url, "POST", "/v1/chat/completions", body) for _ in range(MAX_BATCH)]
    for response in running:
        assert response.status == 200
        while b'"content": "' not in (line := response.readline()) or b'"content": ""' in line:
            pass
    waiting = [_request(url, "POST", "/v1/chat/completions", body) for _ in range(MAX_QUEUE)]
    assert all(response.status == 200 for response in waiting)
    refused = _request(url, "POST", "/v1/chat/completions", body)
    assert refused.status == 429 and refused.getheader("Retry-After") == "1"
    assert json.loads(refused.read())["error"]["code"] == "queue_full"
    metrics = _metrics(url)
    assert metrics["qwenvl_running_requests"] == MAX_BATCH and metrics["qwenvl_queue_depth"] == MAX_QUEUE

    for response in running + waiting:  # the clients go away mid-stream
        response.close()
    deadline = time.monotonic() + 10
    while (metrics := _metrics(url))["qwenvl_running_requests"] or metrics["qwenvl_queue_depth"]:
        assert time.monotonic() < deadline, metrics
        time.sleep(0.05)
    assert metrics['qwenvl_requests_total{finish_reason="cancelled"}'] == MAX_BATCH + MAX_QUEUE
    again = _client(url).chat.completions.create(model=NAME, messages=_ask("Hi."), max_tokens=3, temperature=0)
    assert again.usage.completion_tokens >= 1


@pytest.mark.parametrize("body, message", [
    (b'{"model": "tiny", "messages": [', "not valid JSON"),
    ({"model": "gpt-4o", "messages": _ask("Hi.")}, "model 'gpt-4o' is not served here"),
    ({"model": NAME, "messages": _ask("word " * MAX_LEN)}, f"the context holds {MAX_LEN} tokens"),
    ({"model": NAME, "messages": _ask("Hi."), "max_tokens": MAX_LEN}, "lower max_tokens"),
    ({"model": NAME, "messages": _ask("Hi.", "data:image/png;base64," + base64.b64encode(b"junk").decode())},
     "cannot read image"),
    ({"model": NAME, "messages": _ask("Hi.", "/no/such/cat.png")}, "cannot read image file '/no/such/cat.png'"),
    ({"model": NAME, "messages": _ask("Hi.", "https://example.com/cat.png")}, "remote image URLs are not fetched"),
    ({"model": NAME, "messages": _ask("Hi."), "temperature": -0.5}, "temperature must be >= 0"),
    ({"model": NAME, "messages": _ask("Hi."), "top_p": 1.5}, r"top_p must be in (0, 1]"),
    ({"model": NAME, "messages": _ask("Hi."), "min_p": 1}, "min_p must be in [0, 1)"),
    ({"model": NAME, "messages": _ask("Hi."), "top_k": -2}, "top_k: Input should be greater than or equal to -1"),
    ({"model": NAME, "messages": _ask("Hi."), "n": 0}, "n: Input should be greater than or equal to 1"),
    ({"model": NAME, "messages": _ask("Hi."), "max_tokens": 0}, "max_tokens: Input should be greater than"),
    ({"model": NAME, "messages": _ask("Hi."), "presence_penalty": 0.5}, "use repetition_penalty"),
    ({"model": NAME, "messages": [{"role": "tool", "content": "x"}]}, "role 'tool' is not supported"),
])
def test_bad_input_gets_an_openai_error_and_the_server_keeps_serving(server, body, message):
    url, _, _ = server
    response = _request(url, "POST", "/v1/chat/completions", body)
    text = response.read().decode()
    assert response.status == 400, text
    error = json.loads(text)["error"]
    assert message in error["message"] and error["type"] == "invalid_request_error", error
    assert _get(url, "/health") == (200, '{"status":"ok"}')


def test_completions_models_and_metrics(server):
    url, _, _ = server
    client = _client(url)
    assert [m.id for m in client.models.list().data] == [NAME]
    seeded = [client.completions.create(model=NAME, prompt="Once upon", max_tokens=4, n=2, temperature=1.0,
                                        seed=7) for _ in range(2)]
    texts = [[c.text for c in r.choices] for r in seeded]
    assert texts[0] == texts[1] and texts[0][0] != texts[0][1]  # a seed repeats; its two choices sample apart
    greedy = client.completions.create(model=NAME, prompt="Once upon", max_tokens=8, temperature=0)
    assert len(greedy.choices[0].text) >= 4 and greedy.usage.completion_tokens == 8
    ids = client.completions.create(model=NAME, prompt=[[11, 12, 13], [14, 15]], max_tokens=3, temperature=0)
    assert [c.index for c in ids.choices] == [0, 1] and ids.usage.prompt_tokens == 5
    stop = greedy.choices[0].text[2:4]
    stopped = client.completions.create(model=NAME, prompt="Once upon", max_tokens=8, temperature=0, stop=[stop])
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].text == greedy.choices[0].text[: greedy.choices[0].text.index(stop)]
    streamed = client.completions.create(model=NAME, prompt="Once upon", max_tokens=8, temperature=0, stop=[stop],
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == stopped.choices[0].text  # no part of it

    metrics = _metrics(url)
    assert metrics["qwenvl_time_to_first_token_seconds_count"] >= 8
    assert metrics["qwenvl_decode_tokens_per_second_count"] >= 1
    assert metrics['qwenvl_time_to_first_token_seconds_bucket{le="+Inf"}'] == \
        metrics["qwenvl_time_to_first_token_seconds_count"]
    assert metrics["qwenvl_generation_tokens_total"] > 0 and metrics["qwenvl_prompt_tokens_total"] > 0
    # Each 8-token greedy request above took decode calls; between them the device idled for some host time.
    assert metrics["qwenvl_decode_calls_total"] >= 4 and metrics["qwenvl_decode_host_gap_seconds_total"] > 0


def test_sigterm_finishes_the_streams_in_flight_and_exits(server):
    """Runs last: it stops the module's server."""
    url, process, log = server
    response = _request(url, "POST", "/v1/chat/completions", {
        "model": NAME, "messages": _ask("Go on."), "max_tokens": 40, "temperature": 0, "stream": True})
    lines = [response.readline(), response.readline(), response.readline()]  # the role chunk, a blank, content
    assert b'"content": "' in lines[2]
    process.send_signal(signal.SIGTERM)  # while the request is decoding
    rest = [line.decode().strip() for line in response.read().splitlines() if line.startswith(b"data: ")]
    assert rest[-1] == "data: [DONE]"
    last = json.loads(rest[-2].removeprefix("data: "))
    assert last["choices"][0]["finish_reason"] == "length" and last["usage"]["completion_tokens"] == 40
    # uvicorn ends by raising the signal again once it has shut down, so the exit is SIGTERM's.
    assert process.wait(30) in (0, -signal.SIGTERM), log.read_text()
    with pytest.raises(ConnectionError):
        _get(url, "/health")
    assert "Application shutdown complete" in log.read_text()
