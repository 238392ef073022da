"""Stopping a run cleanly: Ctrl-C, SIGTERM or a ``stop`` command finish the current step, save, then stop."""

from __future__ import annotations

import contextlib
import logging
import signal
from collections.abc import Iterator
from dataclasses import dataclass

log = logging.getLogger("dora_studio")


class StopRequested(Exception):
    """Ctrl-C, SIGTERM or a ``stop`` command: save, then end the run as ``stopped``."""


@dataclass
class StopSignals:
    """``stop`` turns true at the first Ctrl-C or SIGTERM; the loop looks at it after each step."""

    stop: bool = False

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """The first Ctrl-C / SIGTERM asks for a clean stop; a second Ctrl-C interrupts at once."""

        def handler(signum, frame):
            self.stop = True
            log.info("stop requested (%s): finishing this step, then saving", signal.Signals(signum).name)
            signal.signal(signal.SIGINT, signal.default_int_handler)

        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            for sig in previous:
                signal.signal(sig, handler)
        except ValueError:  # not the main thread (e.g. a test harness): no signal handling
            previous = {}
        try:
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)
