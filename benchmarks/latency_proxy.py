"""A TCP proxy that delays every chunk by a fixed time each way: Redis as if across a network.

Run ``python -m benchmarks.latency_proxy --target 127.0.0.1:6379 --delay-us 100``;
it prints the port it listens on, then forwards each accepted connection to
the target. Every chunk read from one side is written to the other
``--delay-us`` microseconds after it was read, measured from its own arrival,
so back-to-back chunks are not delayed twice and a request and its reply
each pay the delay once. Each direction has a reader thread that stamps
chunks and a writer thread that sleeps until each is due. The process asks
the kernel for a timer slack of 1 us (Linux), so a 100 us sleep lasts about
100 us rather than the default 50 us more.

The benchmark starts it as a separate process, so it never competes for the
benchmark's interpreter lock, and reports its own cost: the round trip
through it with no delay, against the round trip straight to Redis.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import queue
import socket
import sys
import threading
import time

_CLOSED = object()


def lower_timer_slack() -> None:
    """Ask Linux for a 1 ns timer slack, so short sleeps wake when asked."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(29, 1, 0, 0, 0)  # PR_SET_TIMERSLACK


def _reader(source: socket.socket, chunks: queue.SimpleQueue[object]) -> None:
    clock = time.perf_counter
    try:
        while True:
            data = source.recv(262144)
            if not data:
                break
            chunks.put((clock(), data))
    except OSError:
        pass
    chunks.put(_CLOSED)


def _writer(target: socket.socket, chunks: queue.SimpleQueue[object], delay: float) -> None:
    clock = time.perf_counter
    try:
        while True:
            item = chunks.get()
            if item is _CLOSED:
                break
            arrived, data = item  # type: ignore[misc]
            wait = arrived + delay - clock()
            if wait > 0:
                time.sleep(wait)
            target.sendall(data)
    except OSError:
        pass
    with contextlib.suppress(OSError):
        target.shutdown(socket.SHUT_WR)


def _relay(client: socket.socket, target: tuple[str, int], delay: float) -> None:
    server = socket.create_connection(target)
    for sock in (client, server):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for source, sink in ((client, server), (server, client)):
        chunks: queue.SimpleQueue[object] = queue.SimpleQueue()
        threading.Thread(target=_reader, args=(source, chunks), daemon=True).start()
        threading.Thread(target=_writer, args=(sink, chunks, delay), daemon=True).start()


def serve(target: tuple[str, int], delay_us: float, port: int = 0) -> None:
    lower_timer_slack()
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(128)
    print(listener.getsockname()[1], flush=True)
    while True:
        client, _ = listener.accept()
        _relay(client, target, delay_us / 1e6)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.latency_proxy", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--target", required=True, help="host:port to forward to")
    parser.add_argument("--delay-us", type=float, default=100.0, help="delay each way, in microseconds")
    parser.add_argument("--port", type=int, default=0, help="port to listen on (default: a free one)")
    ns = parser.parse_args(argv)
    host, _, port = ns.target.rpartition(":")
    try:
        serve((host, int(port)), ns.delay_us, ns.port)
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
