"""Counting XLA compilations in a test (or in a test's subprocess), from jax's own log."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import jax


class CompileCounter(logging.Handler):
    """A handler on the ``jax`` logger counting its "Compiling ..." records."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += record.getMessage().startswith("Compiling")


@contextlib.contextmanager
def compilations() -> Iterator[CompileCounter]:
    """Counts XLA compilations (jax_log_compiles records), eager ops included: a program compiled again for
    inputs that differ only in sharding or commitment counts too, which jit's own cache size may not show."""
    counter, logger = CompileCounter(), logging.getLogger("jax")
    logger.addHandler(counter)
    try:
        with jax.log_compiles(True):
            yield counter
    finally:
        logger.removeHandler(counter)
