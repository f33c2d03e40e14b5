"""The keeper: one daemon thread per worker process that renews its runs' markers.

It also marks, in time, the runs that began unmarked but whose message may
be copied while they run (late acknowledgement on a broker with a visibility
timeout): such a run is marked a quarter of that timeout after its message
was received, long before the broker could deliver a copy. A process whose
runs are all unmarked never starts the thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

from .perprocess import per_process

if TYPE_CHECKING:
    from .config import _AppState

__all__ = ["Keeper", "keeper"]

logger = logging.getLogger(__name__)


class Keeper:
    """Renews the markers this process holds and marks runs before a copy of them can exist."""

    def __init__(self, state: _AppState) -> None:
        self._state = state
        self._markers: dict[str, str] = {}
        #: Runs to mark: id(run) -> (when, how).
        self._pending: dict[int, tuple[float, Callable[[], None]]] = {}
        # Reentrant: a mark made from the loop adds its marker.
        self._lock = threading.RLock()
        self._wake = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None

    def add(self, marker: str, value: str) -> None:
        """Renew ``marker`` (holding ``value``) until :meth:`discard`."""
        with self._lock:
            self._markers[marker] = value
            self._start()

    def discard(self, marker: str) -> None:
        """Stop renewing ``marker``."""
        with self._lock:
            self._markers.pop(marker, None)

    def schedule(self, run: Any, when: float, mark: Callable[[], None]) -> None:
        """Call ``mark()`` at ``when`` (``time.time()``), unless :meth:`cancel` comes first."""
        with self._lock:
            self._pending[id(run)] = (when, mark)
            self._start()
            self._wake.notify()

    def cancel(self, run: Any) -> None:
        """Forget ``run``'s pending mark; returns once no mark of it is under way."""
        with self._lock:
            self._pending.pop(id(run), None)

    def renewing(self) -> int:
        """How many markers this process renews (for tests and the benchmark)."""
        with self._lock:
            return len(self._markers) + len(self._pending)

    def _start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._loop, name="celery-unique-keeper", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        ttl = self._state.config.running_ttl
        next_renewal = time.monotonic() + ttl / 3
        while True:
            with self._lock:
                now = time.time()
                due = [key for key, (when, _) in self._pending.items() if when <= now]
                # Marks are made holding the lock: a run that ends waits in
                # cancel() until its mark is done, so no run is marked after
                # its end.
                for key in due:
                    _, mark = self._pending.pop(key)
                    if not _quietly(mark, "mark a running task"):
                        self._pending[key] = (now + 1, mark)
                renew = time.monotonic() >= next_renewal
                markers = list(self._markers.items()) if renew else []
            # Renewed without the lock, so that no run's end waits behind a
            # lock store that is slow to answer. A renewal never undoes an
            # end: an ended marker no longer holds the value renewed, and a
            # deadline passed deletes instead (HEARTBEAT_SCRIPT).
            if renew:
                next_renewal = time.monotonic() + ttl / 3
                if markers:
                    _quietly(partial(self._state.store.heartbeat, markers, int(ttl * 1000)), "renew markers")
            with self._lock:
                wait = next_renewal - time.monotonic()
                if self._pending:
                    wait = min(wait, min(when for when, _ in self._pending.values()) - time.time())
                self._wake.wait(max(wait, 0.01))


def _quietly(step: Callable[[], Any], what: str) -> bool:
    # Every failure is logged and the loop goes on: a thread that died would
    # let markers expire while their tasks run.
    try:
        step()
    except Exception as exc:
        logger.warning("celery_unique: could not %s (%s: %s); trying again", what, type(exc).__name__, exc)
        return False
    return True


def keeper(state: _AppState) -> Keeper:
    """Return this process's keeper for the app state ``state``."""
    return per_process(state, "keeper", Keeper)
