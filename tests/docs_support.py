"""The code blocks of the README and the docs pages, and how the suite runs them.

The convention (docs/development.md): a fenced block whose info string has
the word ``illustrative`` after its language is only shown. Every other
block runs:

* ``python`` blocks whose first line names a file (``# proj.py``) are that
  file of a project, written before the page runs; the Django and testing
  pages' files make up a Django project (``tests/test_docs.py``);
* ``pycon`` blocks run as doctests (``...`` matches anything), ``python``
  blocks as code, in order, in one namespace per page;
* a page without a ``proj.py`` of its own runs after the quick start's
  (docs/getting-started.md), with its ``app`` and ``send_report``;
* a ``sh`` block ``celery -A proj worker ...`` starts a worker for
  ``proj.app`` (in this process, as the suite's other workers);
* ``localhost:6379`` means the suite's Redis.

Any other block is neither run nor marked, and fails the suite.
"""

from __future__ import annotations

import doctest
import importlib
import io
import re
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from celery import _state
from celery.contrib.testing.worker import start_worker

from celery_unique.testing import RedisServer

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
QUICK_START = DOCS / "getting-started.md"
#: Every page of the docs site that holds code blocks, and the README.
PAGES = (README, ROOT / "CHANGELOG.md", *sorted(DOCS.glob("*.md")))
#: Pages whose blocks are the files of a Django project, run under pytest-django.
DJANGO_PAGES = (DOCS / "django.md", DOCS / "testing.md")
#: MyST directives that hold no code.
NOT_CODE = frozenset({"{toctree}", "{include}", "{eval-rst}"})

_FENCE = re.compile(r"^(?P<indent> *)(?P<fence>`{3,}|~{3,})(?P<info>[^`]*)$")
_FILE = re.compile(r"# (\S+\.py)\b")
_WORKER = re.compile(r"celery -A proj worker\b[^\n#]*(#.*)?\n?")
LOCAL_REDIS = "localhost:6379"


@dataclass(frozen=True)
class Block:
    """A fenced code block: where it is, its language, whether it is only shown, its code."""

    page: Path
    line: int
    language: str
    illustrative: bool
    code: str

    @property
    def where(self) -> str:
        """``page:line`` of the opening fence."""
        page = self.page.relative_to(ROOT) if self.page.is_relative_to(ROOT) else self.page
        return f"{page}:{self.line}"

    @property
    def file(self) -> str | None:
        """The project file a python block is, if its first line names one."""
        match = _FILE.match(self.code) if self.language == "python" else None
        return match.group(1) if match else None

    @property
    def starts_worker(self) -> bool:
        """Whether this is a ``sh`` block that starts the quick start's worker."""
        return self.language == "sh" and _WORKER.fullmatch(self.code) is not None

    @property
    def runs(self) -> bool:
        """Whether the suite runs this block (on its page, or in the Django project)."""
        if self.illustrative:
            return False
        if self.page in DJANGO_PAGES:
            return self.file is not None
        return self.language in ("python", "pycon") or self.starts_worker


def blocks(page: Path) -> list[Block]:
    """The fenced code blocks of a Markdown page, in order (MyST directives without code left out)."""
    lines = page.read_text().splitlines()
    found: list[Block] = []
    i = 0
    while i < len(lines):
        opening = _FENCE.match(lines[i])
        if opening is None:
            i += 1
            continue
        indent, fence = len(opening["indent"]), opening["fence"]
        closing = re.compile(rf" *{re.escape(fence[0])}{{{len(fence)},}}\s*")
        body: list[str] = []
        end = i + 1
        while end < len(lines) and not closing.fullmatch(lines[end]):
            line = lines[end]
            body.append(line[min(indent, len(line) - len(line.lstrip(" "))):])
            end += 1
        words = opening["info"].split()
        language = words[0] if words else ""
        if language not in NOT_CODE:
            found.append(Block(page, i + 1, language, "illustrative" in words[1:], "\n".join(body) + "\n"))
        i = end + 1
    return found


def localize(code: str, server: RedisServer) -> str:
    """The code with the docs' local Redis replaced by the suite's."""
    return code.replace(LOCAL_REDIS, f"{server.host}:{server.port}")


def project_files(page: Path) -> dict[str, str]:
    """Each file a page's python blocks name, mapped to its code (blocks naming one file joined)."""
    files: dict[str, str] = {}
    for block in blocks(page):
        name = block.file
        if name is not None and not block.illustrative:
            files[name] = files.get(name, "") + block.code
    return files


@contextmanager
def page_modules(directory: Path) -> Iterator[None]:
    """Import from ``directory`` first, and leave no trace of the page's modules and tasks.

    A page's ``proj`` is imported afresh, and forgotten afterwards. Its tasks
    are shared tasks (``@app.task`` makes them so), which Celery would add to
    every app finalized later in this process: the finalizers they left are
    dropped with it.
    """
    finalizers = set(_state._on_app_finalizers)
    sys.path.insert(0, str(directory))
    sys.modules.pop("proj", None)
    try:
        yield
    finally:
        sys.path.remove(str(directory))
        sys.modules.pop("proj", None)
        _state._on_app_finalizers.intersection_update(finalizers)


def run_page(page: Path, server: RedisServer, project: Path) -> int:
    """Run the page's blocks as the module docstring says; return how many ran."""
    runnable = [block for block in blocks(page) if block.runs]
    files = project_files(page)
    preamble = ""
    if "proj.py" not in files:
        files["proj.py"] = project_files(QUICK_START)["proj.py"]
        preamble = "from proj import app, send_report\n"
    for name, code in files.items():
        path = project / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(localize(code, server))
    namespace: dict[str, object] = {"__name__": "docs"}
    with page_modules(project), ExitStack() as workers:
        exec(preamble, namespace)
        for block in runnable:
            if block.file is not None:
                continue
            if block.starts_worker:
                app = importlib.import_module("proj").app
                workers.enter_context(
                    start_worker(app, pool="solo", perform_ping_check=False, shutdown_timeout=20)
                )
            elif block.language == "pycon":
                run_doctest(block, localize(block.code, server), namespace)
            else:
                exec(compile(localize(block.code, server), block.where, "exec"), namespace)
    return len(runnable)


def run_doctest(block: Block, code: str, namespace: dict[str, object]) -> None:
    """Run a ``pycon`` block as a doctest in ``namespace``; fail with doctest's report."""
    test = doctest.DocTestParser().get_doctest(code, namespace, block.where, str(block.page), block.line)
    report = io.StringIO()
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    result = runner.run(test, out=report.write, clear_globs=False)
    if result.failed:
        raise AssertionError(f"{block.where}: {result.failed} of {result.attempted} examples failed\n"
                             + report.getvalue())
