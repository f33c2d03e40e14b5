"""The README's quick start runs as written, against the test Redis."""

from __future__ import annotations

import re
from pathlib import Path

import redis

from celery_unique.testing import RedisServer

README = Path(__file__).resolve().parent.parent / "README.md"


def test_quick_start_runs(redis_server: RedisServer, locks: redis.Redis) -> None:
    """The quick-start block takes a lock and its duplicate names the holder."""
    block = re.search(r"## Quick start.*?```python\n(.*?)```", README.read_text(), re.S)
    assert block is not None
    code = (
        block.group(1)
        .replace("redis://localhost:6379/0", redis_server.url(0))
        .replace("redis://localhost:6379/1", redis_server.url(2))
    )
    code = code.replace("    e.task_id ", "    holder = e.task_id ")
    namespace: dict[str, object] = {"__name__": "readme"}
    exec(compile(code, str(README), "exec"), namespace)
    result = namespace["r"]
    assert namespace["holder"] == result.id  # type: ignore[attr-defined]
    (key,) = locks.keys("*")
    assert locks.get(key) == result.id.encode()  # type: ignore[attr-defined]
