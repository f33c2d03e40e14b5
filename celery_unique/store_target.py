"""``StoreTarget``: where the locks live, as :mod:`celery_unique.config` resolves it.

The value both sides share: :func:`celery_unique.config.store_target` builds
it from the app's settings, :func:`celery_unique.connection.connect` opens a
client to it. Neither imports the other for it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .redis_url import RedisAddress, redact

__all__ = ["StoreTarget"]


@dataclass(frozen=True)
class StoreTarget:
    """Where the locks live, resolved from the settings, and how to connect there.

    ``celery_unique.config.StoreTarget`` names it too.
    """

    #: The server (or the Sentinels), with every connection option merged.
    address: RedisAddress
    #: True when the URL is the broker's (``unique_redis_url`` is not set).
    inherited: bool = False
    #: The URL is a seed node of a Redis Cluster.
    cluster: bool = False
    #: Name of the Sentinel-managed master, for a ``sentinel://`` URL.
    master_name: str | None = None
    #: Options of the connections to the Sentinels themselves.
    sentinel_kwargs: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        """Where the locks live, with every password hidden."""
        where = redact(self.address.url)
        if self.master_name is not None:
            where += f" master {self.master_name!r}"
        if self.cluster:
            where = f"Redis Cluster {where}"
        source = f"from {self.address.setting}" if self.inherited else self.address.setting
        return f"{where} ({source})"
