"""The package's shape: no import circles, and a ``UniqueTask`` that reads in one screen.

Both are read from the source with ``ast``, so each check fails with the
cycle, the method or the line count that breaks it.
"""

from __future__ import annotations

import ast
import itertools
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "celery_unique"
TASK_MODULE = PACKAGE / "task.py"

#: UniqueTask's methods that keep a signature Celery defines (``Task``'s
#: public API), whatever their length: callers pass their arguments positionally.
CELERY_SIGNATURES = frozenset({"apply_async", "apply", "signature"})
#: Parameters a method of UniqueTask may take besides ``self``.
MAX_PARAMETERS = 5
#: Lines the class may span, decorators and docstring included.
MAX_CLASS_LINES = 220

Edges = dict[str, dict[str, set[str]]]


def package_imports(package: Path = PACKAGE) -> tuple[Edges, Edges]:
    """Map each module to the package modules it imports: at module level, and inside functions.

    Module level includes ``if TYPE_CHECKING:`` blocks: a circle that only the
    type checker follows is still a circle in the design.
    """
    modules = {path.stem for path in package.glob("*.py")}
    top: Edges = {name: {} for name in modules}
    inner: Edges = {name: {} for name in modules}

    def visit(node: ast.AST, module: Path, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.ImportFrom) and child.level == 1:
                names = [child.module.split(".")[0]] if child.module else [a.name for a in child.names]
                for name in names:
                    if name in modules:
                        edges = inner if nested else top
                        edges[module.stem].setdefault(name, set()).add(f"{module.name}:{child.lineno}")
            visit(child, module, nested)

    for path in sorted(package.glob("*.py")):
        visit(ast.parse(path.read_text(), str(path)), path, False)
    return top, inner


def find_cycle(edges: Edges) -> list[str] | None:
    """Return one import cycle as ``[a, b, ..., a]``, or None if the graph is acyclic."""
    done: set[str] = set()
    path: list[str] = []

    def walk(module: str) -> list[str] | None:
        if module in path:
            return [*path[path.index(module):], module]
        if module in done:
            return None
        path.append(module)
        for target in sorted(edges.get(module, {})):
            cycle = walk(target)
            if cycle is not None:
                return cycle
        path.pop()
        done.add(module)
        return None

    for module in sorted(edges):
        cycle = walk(module)
        if cycle is not None:
            return cycle
    return None


def describe(cycle: list[str], edges: Edges) -> str:
    """The cycle, with the line of one import of each of its steps."""
    places = sorted(min(edges[a][b]) for a, b in itertools.pairwise(cycle))
    return f"{' -> '.join(cycle)} ({', '.join(places)})"


def merged(*graphs: Edges) -> Edges:
    edges: Edges = {}
    for graph in graphs:
        for source, targets in graph.items():
            for target, places in targets.items():
                edges.setdefault(source, {}).setdefault(target, set()).update(places)
    return edges


def unique_task_class(source: str | None = None) -> ast.ClassDef:
    """The ``UniqueTask`` class of task.py (or of ``source``)."""
    tree = ast.parse(TASK_MODULE.read_text() if source is None else source)
    return next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "UniqueTask")


def methods(cls: ast.ClassDef) -> list[ast.FunctionDef | ast.AsyncFunctionDef]:
    """The class's own methods, those under ``if TYPE_CHECKING:`` included (nested functions not)."""
    found: list[ast.FunctionDef | ast.AsyncFunctionDef] = []
    pending: list[ast.stmt] = list(cls.body)
    while pending:
        node = pending.pop(0)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            found.append(node)
        elif isinstance(node, ast.If):
            pending.extend(node.body + node.orelse)
    return found


def parameter_count(function: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Parameters besides ``self``: positional, keyword-only, ``*args`` and ``**kwargs`` alike."""
    arguments = function.args
    count = len(arguments.posonlyargs) + len(arguments.args) + len(arguments.kwonlyargs)
    count += (arguments.vararg is not None) + (arguments.kwarg is not None)
    return count - 1  # self


def long_methods(cls: ast.ClassDef) -> dict[str, int]:
    """The methods with more than MAX_PARAMETERS parameters, but Celery's signatures."""
    return {
        f.name: parameter_count(f)
        for f in methods(cls)
        if f.name not in CELERY_SIGNATURES and parameter_count(f) > MAX_PARAMETERS
    }


def class_lines(cls: ast.ClassDef) -> int:
    """Lines the class spans, from its first decorator to its last line."""
    first = min([cls.lineno, *(d.lineno for d in cls.decorator_list)])
    return (cls.end_lineno or cls.lineno) - first + 1


def test_module_level_imports_form_no_cycle() -> None:
    """No two modules of the package import each other, directly or through others, at module level."""
    top, _ = package_imports()

    cycle = find_cycle(top)

    assert cycle is None, f"import cycle: {describe(cycle, top)}"


def test_no_cycle_even_through_imports_inside_functions() -> None:
    """Counting the imports made inside functions too, the package's imports still form no cycle."""
    top, inner = package_imports()
    edges = merged(top, inner)

    cycle = find_cycle(edges)

    assert cycle is None, f"import cycle: {describe(cycle, edges)}"


def test_cycle_check_names_the_cycle(tmp_path: Path) -> None:
    """A package whose modules import each other fails the check, which names the cycle and its lines."""
    (tmp_path / "a.py").write_text("from .b import x\n")
    (tmp_path / "b.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import y\n"
    )
    (tmp_path / "c.py").write_text("def f():\n    from . import a\n")
    top, inner = package_imports(tmp_path)

    cycle = find_cycle(top)

    assert cycle == ["a", "b", "a"]
    assert describe(cycle, top) == "a -> b -> a (a.py:1, b.py:3)"
    assert inner == {"a": {}, "b": {}, "c": {"a": {"c.py:2"}}}


def test_task_module_holds_the_class_and_nothing_else() -> None:
    """task.py defines UniqueTask and no other class or function: helpers live where they belong."""
    tree = ast.parse(TASK_MODULE.read_text(), str(TASK_MODULE))
    definitions = (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)

    defined = [node.name for node in tree.body if isinstance(node, definitions)]

    assert defined == ["UniqueTask"]


def test_unique_task_reads_in_one_screen() -> None:
    """The UniqueTask class spans at most MAX_CLASS_LINES lines."""
    lines = class_lines(unique_task_class())

    assert lines <= MAX_CLASS_LINES, f"UniqueTask spans {lines} lines (at most {MAX_CLASS_LINES})"


def test_unique_task_methods_take_few_parameters() -> None:
    """Each of UniqueTask's own methods takes at most MAX_PARAMETERS besides self, but Celery's signatures."""
    long = long_methods(unique_task_class())

    assert not long, f"methods with more than {MAX_PARAMETERS} parameters: {long}"


def test_shape_checks_catch_a_long_class() -> None:
    """A 230-line UniqueTask with a six-parameter helper fails both checks; apply_async is excused."""
    source = (
        "class UniqueTask:\n"
        "    def apply_async(self, a, b, c, d, e, f, g, **options): ...\n"
        "    if TYPE_CHECKING:\n"
        "        def _lock(self, a, b, c, d, e, f): ...\n"
        + "    x = 1\n" * 226
    )
    cls = unique_task_class(source)

    assert long_methods(cls) == {"_lock": 6}
    assert class_lines(cls) == 230 > MAX_CLASS_LINES


@pytest.mark.parametrize(
    ("source", "count"),
    [
        ("def f(self): ...", 0),
        ("def f(self, a, b=1, *, c): ...", 3),
        ("def f(self, a, /, b, *args, c, **kwargs): ...", 5),
        ("def f(self, a, b, c, d, e, f): ...", 6),
    ],
)
def test_parameter_count_counts_every_kind(source: str, count: int) -> None:
    """The parameter count behind the method check counts every kind of parameter but self."""
    function = ast.parse(source).body[0]
    assert isinstance(function, ast.FunctionDef)

    assert parameter_count(function) == count


def test_celery_signatures_are_the_only_long_ones() -> None:
    """Each method excused from the parameter check exists and is long: the list holds no stale name."""
    by_name = {f.name: parameter_count(f) for f in methods(unique_task_class())}

    assert {name: by_name.get(name, 0) > MAX_PARAMETERS for name in CELERY_SIGNATURES} == dict.fromkeys(
        CELERY_SIGNATURES, True
    )
