"""The online engine: requests arrive at any time, from any thread, and join the running batch between decode calls.

One background thread owns the device: it drives the engine's ``Scheduler`` and hands each ``TokenEvent`` to the
callback its request came with. Other threads only put requests and cancellations into an inbox, which the loop
takes between calls, so the compiled programs, the donated state and the no-host-sync steady state are those of
``Engine.run``. A bounded queue gives backpressure: past ``max_batch`` running and ``max_queue`` waiting requests,
``submit`` refuses with ``QueueFull``.

Events go to their callbacks as the loop reads them. Holding a request's later events until the next decode call
was out, so that the server's per-event work would overlap the device, measured worse on an H100 (Qwen3.5-9B, 64
streams: 15.6% below in-process throughput against 9.5%, inter-token p99 213 ms against 45) and was taken out.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable

from qwenvl_jax.engine import Engine, Request, Scheduler, TokenEvent

Deliver = Callable[[TokenEvent], None]


class QueueFull(RuntimeError):
    """Every slot is running and the waiting queue is full: retry later."""


class EngineClosed(RuntimeError):
    """The engine is shutting down, or its loop failed: it takes no more requests."""


class OnlineEngine:
    """Serves one ``Engine`` from a background thread. ``submit(request, deliver)`` returns at once; the loop calls
    ``deliver`` (on its own thread: keep it short, e.g. hand the event to an asyncio loop) with each of the
    request's events, the last one ``finished``. ``finish_reason`` "cancelled" ends a cancelled request, "error"
    every request of a loop that failed (``error`` holds the exception)."""

    def __init__(self, engine: Engine, max_queue: int = 256, stream: bool = True):
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        self.engine = engine
        self.max_queue = max_queue
        self._scheduler = Scheduler(engine, stream=stream)
        engine.online = self  # from now on only this loop drives the engine's slots
        self._cond = threading.Condition()
        self._inbox: list[tuple[int, Request]] = []
        self._cancels: list[int] = []
        self._deliver: dict[int, Deliver] = {}  # requests submitted and not yet ended
        self._ids = itertools.count()
        self._closing = False
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="qwenvl-engine", daemon=True)
        self._thread.start()

    # ---- any thread
    def submit(self, request: Request, deliver: Deliver) -> int:
        """Queues a request; returns its id. ValueError: the request cannot run (checked here, in the caller's
        thread); QueueFull: no room now; EngineClosed: no more requests will run."""
        self.engine.validate(request)
        with self._cond:
            if self.error is not None:
                raise EngineClosed(f"the engine loop failed: {self.error!r}")
            if self._closing:
                raise EngineClosed("the engine is shutting down")
            if len(self._deliver) >= self.engine.config.max_batch + self.max_queue:
                waits = "1 request waits" if self.max_queue == 1 else f"{self.max_queue} requests wait"
                raise QueueFull(f"all {self.engine.config.max_batch} decode slots are busy and {waits} (the queue "
                                "is full): retry later")
            request_id = next(self._ids)
            self._deliver[request_id] = deliver
            self._inbox.append((request_id, request))
            self._cond.notify()
        return request_id

    def cancel(self, request_id: int) -> None:
        """Ends a request: its slot is free before the next decode call, and its last event says "cancelled"
        (nothing happens to a request that has already ended)."""
        with self._cond:
            if request_id in self._deliver:
                self._cancels.append(request_id)
                self._cond.notify()

    @property
    def running(self) -> int:
        """Requests holding a decode slot."""
        return self._scheduler.running

    @property
    def waiting(self) -> int:
        """Requests submitted and not yet holding a slot."""
        with self._cond:
            return max(0, len(self._deliver) - self._scheduler.running)

    @property
    def decode_calls(self) -> int:
        """Decode calls dispatched (``Scheduler.decode_calls``)."""
        return self._scheduler.decode_calls

    @property
    def host_gap_s(self) -> float:
        """Seconds the device idled between decode calls for the host (``Scheduler.host_gap_s``)."""
        return self._scheduler.host_gap_s

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    def close(self, timeout: float | None = None) -> None:
        """Takes no more requests, cancels those not ended, and waits for the loop to finish reading the device.
        The engine can then run requests again (``generate``)."""
        with self._cond:
            self._closing = True
            self._cancels += list(self._deliver)
            self._cond.notify()
        self._thread.join(timeout)
        if not self._thread.is_alive():
            self.engine.online = None

    # ---- the loop's thread
    def _loop(self) -> None:
        scheduler = self._scheduler
        try:
            while True:
                with self._cond:
                    while not (self._inbox or self._cancels or scheduler.busy or self._closing):
                        self._cond.wait()
                    if self._closing and not (self._inbox or self._cancels or scheduler.busy):
                        return
                    inbox, self._inbox = self._inbox, []
                    cancels, self._cancels = self._cancels, []
                for request_id, request in inbox:
                    scheduler.submit(request_id, request)
                for request_id in cancels:
                    scheduler.cancel(request_id)
                for event in scheduler.step():
                    self._emit(event)
        except BaseException as e:  # a device error: every request not ended gets its end, and no more come
            with self._cond:
                self.error = e
                ended, self._deliver = self._deliver, {}
            for request_id, deliver in ended.items():
                deliver(TokenEvent(request_id, [], True, "error"))
            raise

    def _emit(self, event: TokenEvent) -> None:
        with self._cond:
            deliver = self._deliver.pop(event.request_index) if event.finished else \
                self._deliver[event.request_index]
        deliver(event)
