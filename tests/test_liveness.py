"""A marker's owner on this machine is shown dead exactly when its process is gone."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from celery_unique import liveness


def test_a_live_process_is_not_shown_dead() -> None:
    """This process, named with its own proof, is alive."""
    assert not liveness.shown_dead(liveness.owner("node"), liveness.proof())


def test_an_exited_process_is_shown_dead_reaped_or_not() -> None:
    """A process that exited is dead, whether its parent reaped it or it lingers as a zombie."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.3)"])
    machine = liveness.proof().partition(":")[0]
    started = liveness._started(child.pid)
    owner, proof = f"node/{child.pid}", f"{machine}:{started}"
    assert not liveness.shown_dead(owner, proof)
    deadline = time.monotonic() + 10
    while liveness._started(child.pid) == started and time.monotonic() < deadline:
        time.sleep(0.05)  # exited, not yet waited for: a zombie
    assert liveness.shown_dead(owner, proof)
    child.wait()
    assert liveness.shown_dead(owner, proof)


def test_an_owner_on_another_machine_is_never_shown_dead() -> None:
    """A marker from another machine cannot be judged here: its owner is taken to be alive."""
    assert not liveness.shown_dead(f"node/{os.getpid() + 10**6}", "another-machine:123")


def test_a_thread_owner_names_its_thread() -> None:
    """A copy run off the main thread (a threads or gevent pool) has an owner of its own."""
    import threading

    seen: list[str] = []
    thread = threading.Thread(target=lambda: seen.append(liveness.owner("node")))
    thread.start()
    thread.join()
    assert seen[0].startswith(f"node/{os.getpid()}.")
    assert liveness.owner("node") == f"node/{os.getpid()}"
