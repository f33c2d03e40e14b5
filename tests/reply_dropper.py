"""A TCP proxy on loopback that forwards Redis commands and, once armed, loses one reply.

``ReplyDropper(port)`` listens on a free loopback port of its own
(``.port``) and forwards each connection to the Redis server on ``port``,
byte for byte, in both directions. ``arm(b"EVALSHA", sha)`` makes it watch
the commands clients send: the first whose leading arguments are those is
forwarded to the server, and when the server's reply comes the proxy closes
both sockets instead of passing it on. The client sees a connection lost
after the server ran its command, which is what a resend must survive.
``dropped`` is set once that has happened.

A reply is told from what follows it by order alone: the client must wait
for each reply before it sends the next command, as redis-py does outside
pipelines (and as Sentinels and replicas do on the links it also carries).
"""

from __future__ import annotations

import socket
import threading
from contextlib import suppress
from typing import Any

from celery_unique.testing import Service

HOST = "127.0.0.1"


class ReplyDropper(Service):
    """Forwards loopback connections to one Redis port and drops one reply when armed."""

    def __init__(self, target_port: int) -> None:
        self.target = (HOST, target_port)
        self._listener = socket.create_server((HOST, 0))
        self.port: int = self._listener.getsockname()[1]
        #: Set once a reply has been dropped.
        self.dropped = threading.Event()
        self._lock = threading.Lock()
        self._armed: tuple[bytes, ...] | None = None
        self._links: list[_Link] = []
        self._thread = threading.Thread(target=self._accept, name="reply-dropper", daemon=True)

    def start(self) -> ReplyDropper:
        """Start accepting connections."""
        self._thread.start()
        return self

    def arm(self, *prefix: bytes) -> None:
        """Drop the reply of the next command whose leading arguments are ``prefix`` (case-insensitive)."""
        with self._lock:
            self._armed = tuple(part.lower() for part in prefix)
            self.dropped.clear()

    def close(self) -> None:
        """Stop listening and close every connection."""
        with suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes accept() on Linux; close() alone does not
        self._listener.close()
        with self._lock:
            links = list(self._links)
        for link in links:
            link.close()
        self._thread.join(timeout=5)

    def _takes(self, command: list[bytes]) -> bool:
        # Whether ``command`` is the armed one; disarms on a match.
        with self._lock:
            armed = self._armed
            if armed is None or [part.lower() for part in command[: len(armed)]] != list(armed):
                return False
            self._armed = None
            return True

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:  # closed
                return
            try:
                server = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            link = _Link(self, client, server)
            with self._lock:
                self._links.append(link)
            threading.Thread(target=link.upstream, name="reply-dropper-up", daemon=True).start()
            threading.Thread(target=link.downstream, name="reply-dropper-down", daemon=True).start()


class _Link:
    """One client connection and the server connection it is forwarded to."""

    def __init__(self, dropper: ReplyDropper, client: socket.socket, server: socket.socket) -> None:
        self.dropper = dropper
        self.client = client
        self.server = server
        #: Set before the armed command is sent on: the next bytes back are its reply.
        self.doomed = False

    def upstream(self) -> None:
        buffer = b""
        try:
            while chunk := self.client.recv(65536):
                buffer += chunk
                while (parsed := _command(buffer)) is not None:
                    command, size = parsed
                    if self.dropper._takes(command):
                        self.doomed = True
                    self.server.sendall(buffer[:size])
                    buffer = buffer[size:]
        except OSError:
            pass
        finally:
            self.close()

    def downstream(self) -> None:
        try:
            while chunk := self.server.recv(65536):
                if self.doomed:
                    self.dropper.dropped.set()
                    return
                self.client.sendall(chunk)
        except OSError:
            pass
        finally:
            self.close()

    def close(self) -> None:
        for sock in (self.client, self.server):
            with suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


def _command(buffer: bytes) -> tuple[list[bytes], int] | None:
    """The first whole command in ``buffer`` and its length in bytes, or None if it is not all there."""
    end = buffer.find(b"\r\n")
    if end < 0:
        return None
    if not buffer.startswith(b"*"):  # an inline command: one line of words
        return buffer[:end].split(), end + 2
    at, parts = end + 2, []
    for _ in range(int(buffer[1:end])):
        end = buffer.find(b"\r\n", at)
        if end < 0:
            return None
        start = end + 2
        stop = start + int(buffer[at + 1 : end])  # "$<length>"
        if len(buffer) < stop + 2:
            return None
        parts.append(buffer[start:stop])
        at = stop + 2
    return parts, at


def app_behind(dropper: ReplyDropper, redis_url: Any, name: str) -> Any:
    """A Celery app on the suite's Redis whose lock store is reached through ``dropper``.

    ``redis_url(db)`` gives the suite's Redis URL of a database (``RedisServer.url``).
    """
    from celery import Celery

    from tests.conftest import BROKER_DB, LOCK_DB, RESULT_DB

    app = Celery(name, set_as_current=False)
    app.conf.update(
        broker_url=redis_url(BROKER_DB),
        result_backend=redis_url(RESULT_DB),
        unique_redis_url=f"redis://{HOST}:{dropper.port}/{LOCK_DB}",
        broker_connection_retry_on_startup=False,
        task_default_queue="celery",
    )
    return app
