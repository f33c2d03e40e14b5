"""A 3-primary Redis Cluster on loopback ports, started and torn down by a test."""

from __future__ import annotations

import random
import socket
import time

import redis

from celery_unique.testing import RedisServer, Service

SLOTS = 16384


class LocalCluster(Service):
    """Three ``redis-server --cluster-enabled`` primaries sharing the 16384 slots."""

    def __init__(self, primaries: int = 3) -> None:
        self.nodes = [
            RedisServer(
                port=_cluster_port(),
                extra_args=["--cluster-enabled", "yes", "--cluster-node-timeout", "2000"],
            )
            for _ in range(primaries)
        ]

    @property
    def url(self) -> str:
        """A seed node's URL, as a cluster client is given."""
        return self.nodes[0].url(0)

    def start(self, timeout: float = 20.0) -> LocalCluster:
        try:
            self._start(timeout)
        except BaseException:
            self.close()  # no node outlives a cluster that did not come up
            raise
        return self

    def _start(self, timeout: float) -> None:
        for node in self.nodes:
            node.start()
        clients = [node.client() for node in self.nodes]
        # Split the slots evenly, then introduce every node to the first one:
        # the same steps as `redis-cli --cluster create`, without needing redis-cli.
        share = SLOTS // len(self.nodes)
        for index, client in enumerate(clients):
            first = index * share
            last = SLOTS if index == len(clients) - 1 else first + share
            client.execute_command("CLUSTER ADDSLOTS", *range(first, last))
        for node in self.nodes[1:]:
            clients[0].execute_command("CLUSTER MEET", node.host, node.port)
        deadline = time.monotonic() + timeout
        while not all(_cluster_ok(client, len(clients)) for client in clients):
            if time.monotonic() > deadline:
                raise RuntimeError("the local Redis Cluster did not reach cluster_state:ok")
            time.sleep(0.1)

    def close(self) -> None:
        for node in self.nodes:
            node.close()


def _cluster_port() -> int:
    # A cluster node also listens on its port + 10000 for the cluster bus, so
    # the port must be at most 55535 and both must be free.
    for _ in range(200):
        port = random.randint(20000, 30000)
        if _free(port) and _free(port + 10000):
            return port
    raise RuntimeError("no free port pair for a cluster node")


def _free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _cluster_ok(client: redis.Redis, nodes: int) -> bool:
    info = client.cluster("INFO")  # redis-py parses CLUSTER INFO into a dict
    return bool(info["cluster_state"] == "ok" and int(info["cluster_known_nodes"]) == nodes)
