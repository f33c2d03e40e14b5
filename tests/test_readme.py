"""The README as the package index shows it: short, absolute links, a working install and quick start."""

from __future__ import annotations

import re
from pathlib import Path

from celery_unique.testing import RedisServer

from .docs_support import README, blocks, run_page

TEXT = README.read_text()
#: The package index shows the README as the project's page: keep it to one screenful or so.
MAX_BYTES = 12 * 1024


def test_readme_is_short() -> None:
    """The README stays within 12 KB; the docs site holds the rest."""
    assert len(README.read_bytes()) <= MAX_BYTES


def test_every_link_is_absolute() -> None:
    """Every link is an https URL: relative links break on the package index."""
    targets = re.findall(r"\]\(([^)\s]+)\)", TEXT) + re.findall(r"<([^>\s]+)>", TEXT)
    assert targets
    assert [target for target in targets if not target.startswith("https://")] == []


def test_shows_the_development_commands() -> None:
    """The README shows make demo, make test, make lint, make matrix and make docs."""
    shown = {block.code for block in blocks(README) if block.language == "sh"}
    for command in ("make demo", "make test", "make lint", "make matrix", "make docs"):
        assert any(re.search(rf"^{command}\b", code, re.M) for code in shown), command


def test_install_works_before_a_release() -> None:
    """The install commands shown work before 0.1.0 is on the package index, which is named only for later."""
    commands = "".join(block.code for block in blocks(README) if block.language == "sh")
    assert "pip install git+https://github.com/celery-unique/celery-unique" in commands
    assert re.search(r"^pip install \.\s", commands, re.M)
    assert "pip install celery-unique" not in commands
    assert "Once 0.1.0 is published, `pip install celery-unique`" in TEXT


def test_quick_start_runs(redis_server: RedisServer, tmp_path: Path) -> None:
    """The quick start's proj.py, its worker and its session run as shown: a refusal, then a release."""
    worker_blocks = [block for block in blocks(README) if block.starts_worker]
    assert len(worker_blocks) == 1
    assert run_page(README, redis_server, tmp_path) >= 3
