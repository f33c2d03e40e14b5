"""Who runs a copy of a task, and whether that owner can be shown dead.

A running marker names its owner, ``<worker node>/<pid>`` (``.<thread>`` when
the copy runs off the process's main thread: a threads or gevent pool), and
carries a proof of the owner's life: ``<machine>:<process start>``. A copy
that finds a marker whose owner is on this machine and whose process no
longer exists (or is another process under a reused pid) shows the owner
dead and runs at once; an owner elsewhere is dead only once its marker
expires, ``unique_running_ttl`` after its last heartbeat.
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading

__all__ = ["owner", "proof", "shown_dead"]


def _read(path: str) -> str:
    try:
        with open(path) as file:
            return file.read().strip()
    except OSError:
        return ""


def _machine() -> str:
    # The host name alone repeats across containers and reboots; the boot id
    # and the pid namespace make "this machine" exact where Linux has them.
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        namespace = ""
    parts = (socket.gethostname(), _read("/proc/sys/kernel/random/boot_id"), namespace)
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def _started(pid: int) -> str:
    """When process ``pid`` started, in clock ticks since boot; "" if there is no such process."""
    stat = _read(f"/proc/{pid}/stat")
    if stat:
        fields = stat.rpartition(")")[2].split()
        # A zombie (killed, its parent gone too, not yet reaped) is dead.
        return "" if fields[0] in ("Z", "X") else fields[19]
    if os.path.isdir("/proc/self"):
        return ""  # Linux, and no such process
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return ""
    except OSError:
        pass
    return "?"  # alive, or cannot tell: never shown dead


_MACHINE = _machine()
_proof: tuple[int, str] | None = None


def owner(node: str | None, pid: int | None = None) -> str:
    """The owner of a copy run by this thread: ``<node>/<pid>``, ``.<thread>`` off the main thread."""
    where = f"{(node or 'local').replace('|', '%7C')}/{os.getpid() if pid is None else pid}"
    if pid is None and threading.current_thread() is not threading.main_thread():
        where += f".{threading.get_ident()}"
    return where


def proof() -> str:
    """This process's proof of life: ``<machine>:<process start>``."""
    global _proof
    pid = os.getpid()
    if _proof is None or _proof[0] != pid:
        _proof = (pid, f"{_MACHINE}:{_started(pid)}")
    return _proof[1]


def shown_dead(marker_owner: str, marker_proof: str) -> bool:
    """Whether the owner of a marker is certainly dead: its process on this machine is gone."""
    machine, _, started = marker_proof.partition(":")
    if machine != _MACHINE or not started or started == "?":
        return False
    try:
        pid = int(marker_owner.rpartition("/")[2].partition(".")[0])
    except ValueError:
        return False
    return _started(pid) != started
