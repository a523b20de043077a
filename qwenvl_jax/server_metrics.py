"""The server's metrics in Prometheus' text exposition format (no client library: a few counters and histograms)."""

from __future__ import annotations

import bisect
import collections
import threading
from collections.abc import Callable, Sequence

PREFIX = "qwenvl_"
TTFT_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TOKENS_PER_S_BUCKETS = (1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500)


class Histogram:
    def __init__(self, name: str, help_text: str, buckets: Sequence[float]):
        self.name, self.help_text, self.buckets = PREFIX + name, help_text, tuple(buckets)
        self._counts = [0] * (len(self.buckets) + 1)  # the last: above every bucket (+Inf only)
        self._sum = 0.0

    def observe(self, value: float) -> None:
        self._counts[bisect.bisect_left(self.buckets, value)] += 1
        self._sum += value

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help_text}", f"# TYPE {self.name} histogram"]
        cumulative = 0
        for bound, count in zip(self.buckets, self._counts):
            cumulative += count
            lines.append(f'{self.name}_bucket{{le="{bound}"}} {cumulative}')
        total = cumulative + self._counts[-1]
        lines += [f'{self.name}_bucket{{le="+Inf"}} {total}', f"{self.name}_sum {self._sum}",
                  f"{self.name}_count {total}"]
        return lines


class ServerMetrics:
    """What /metrics reports: queue depth, running requests, decode calls and the device's idle time between them
    (read from the engine when scraped), requests by finish reason, prompt and generated tokens, and histograms of
    time to first token and decode speed."""

    def __init__(self, queue_depth: Callable[[], int], running: Callable[[], int], decode_calls: Callable[[], int],
                 host_gap_s: Callable[[], float]):
        self._from_engine = {  # name: (help, type, read when scraped)
            "queue_depth": ("requests waiting for a decode slot", "gauge", queue_depth),
            "running_requests": ("requests holding a decode slot", "gauge", running),
            "decode_calls_total": ("decode calls dispatched", "counter", decode_calls),
            "decode_host_gap_seconds_total": ("host seconds from reading a decode call to dispatching the next, in "
                                              "loop iterations that admit no request (the device idles)", "counter",
                                              host_gap_s)}
        self._lock = threading.Lock()
        self._finished: collections.Counter[str] = collections.Counter()
        self._tokens = {"prompt": 0, "generation": 0}
        self.ttft = Histogram("time_to_first_token_seconds", "request received -> first token (s)", TTFT_BUCKETS_S)
        self.tokens_per_s = Histogram("decode_tokens_per_second", "a request's tokens after the first / the time "
                                      "after its first token", TOKENS_PER_S_BUCKETS)

    def first_token(self, seconds: float) -> None:
        with self._lock:
            self.ttft.observe(seconds)

    def prompt(self, tokens: int) -> None:
        with self._lock:
            self._tokens["prompt"] += tokens

    def finished(self, reason: str, new_tokens: int, decode_s: float) -> None:
        """One choice ended: ``decode_s`` is the time from its first token to its last."""
        with self._lock:
            self._finished[reason] += 1
            self._tokens["generation"] += new_tokens
            if new_tokens > 1 and decode_s > 0:
                self.tokens_per_s.observe((new_tokens - 1) / decode_s)

    def render(self) -> str:
        lines = []
        for name, (help_text, kind, read) in self._from_engine.items():
            lines += [f"# HELP {PREFIX}{name} {help_text}", f"# TYPE {PREFIX}{name} {kind}", f"{PREFIX}{name} {read()}"]
        with self._lock:
            name = f"{PREFIX}requests_total"
            lines += [f"# HELP {name} requests (choices) ended, by finish reason", f"# TYPE {name} counter"]
            lines += [f'{name}{{finish_reason="{reason}"}} {n}' for reason, n in sorted(self._finished.items())]
            for kind, n in self._tokens.items():
                name = f"{PREFIX}{kind}_tokens_total"
                lines += [f"# HELP {name} {kind} tokens of accepted requests", f"# TYPE {name} counter", f"{name} {n}"]
            lines += self.ttft.render() + self.tokens_per_s.render()
        return "\n".join(lines) + "\n"
