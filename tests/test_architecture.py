"""The package's import structure: no import cycle between files of src/attnlab, and the core rooms
(``models/``, ``layers/``, ``attention/``) import nothing from the application rooms (``training/``,
``tasks/``, ``bench/``, ``tour/``, ``commands/``).

How the file-level import graph is built (every ``.py`` file under src/attnlab parsed with ``ast``):

- Every import statement counts, at module level *and* inside functions, methods, ``try`` or ``if``
  blocks: a function-level import hides a dependency from import time but not from the design (the two
  files still need each other). Calls ``importlib.import_module("attnlab.x")`` and
  ``__import__("attnlab.x")`` with a literal name count too, and so does a string that is exactly the name
  of a module of the package (the command and benchmark tables name the modules they import on demand).
  Names built at run time from pieces are invisible to this check.
- Imports under ``if TYPE_CHECKING:`` do not count: they never execute, so they cannot form a cycle.
- ``import attnlab.a.b`` is an edge to the file of ``attnlab.a.b``. ``from attnlab.a import n`` is an edge
  to the file of ``attnlab.a.n`` when ``n`` is a submodule, else to the file that defines ``attnlab.a``
  itself (``a.py`` or ``a/__init__.py``), where ``n`` is looked up. Relative imports are resolved first.
- Importing ``attnlab.a.b`` also runs ``attnlab/a/__init__.py`` (and ``attnlab/__init__.py``) first, but
  that is *not* an edge to them: the child uses nothing defined there. So a package ``__init__`` that
  re-exports its children (edges ``__init__ -> child``) is not in a cycle with them. It is when a child
  (or anything it imports) imports a name from the package itself (``from attnlab.attention import
  merge_partials`` inside ``attention/flash.py``): then the child needs the ``__init__`` to have run far
  enough to define that name while the ``__init__`` is still importing the child -- a real cycle, which
  works or breaks depending on the order of the ``__init__``'s lines. The edge is reported as such.

A cycle is reported as a path of files (``a.py -> b.py -> a.py``), each elementary cycle once, starting
at its alphabetically first file. Known cycles in files another owner is changing sit in an allow-list
with their owner; the test fails on any cycle not listed *and* on any listed cycle that no longer exists,
so the list empties as the cycles are removed and cannot go stale.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "attnlab"

CORE = ("models", "layers", "attention")
APPLICATION = ("training", "tasks", "bench", "tour", "commands")

# Cycles that exist today (2026-12-04) in files owned by someone else, each (file, ..., file) from its
# alphabetically first file, as this test reports them. Empty this list as they are removed: a listed cycle
# that no longer exists fails the test too.
KNOWN_CYCLES: dict[tuple[str, ...], str] = {}  # none left: a new cycle fails the test

# Core -> application imports that exist today in files owned by someone else: (importer, imported).
KNOWN_LAYER_VIOLATIONS: dict[tuple[str, str], str] = {}


# ----------------------------------------------------------------------------- the graph
def module_files(src: Path = SRC) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the package (``a/__init__.py`` is ``a``)."""
    files = {}
    for path in sorted((src / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        files[".".join(parts)] = path
    return files


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _runtime_nodes(tree: ast.AST) -> Iterator[ast.AST]:
    """Every node of the tree except what sits under ``if TYPE_CHECKING:`` (its ``else`` branch does run)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def imported_names(tree: ast.AST, module: str, is_package: bool) -> Iterator[tuple[str, str | None, int]]:
    """(module, name or None, line) for every import in the tree: ``from m import n`` gives (m, n), the other
    forms (m, None). Relative imports are made absolute against ``module``."""
    package = module if is_package else module.rpartition(".")[0]
    for node in _runtime_nodes(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, None, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                yield base, (None if alias.name == "*" else alias.name), node.lineno
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                yield node.args[0].value, None, node.lineno
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith(f"{PACKAGE}."):
            yield node.value, None, node.lineno  # a module named in a table and imported later by name


def import_graph(src: Path = SRC) -> dict[str, dict[str, list[int]]]:
    """File-level import graph: importer -> {imported: [line numbers]}, files as paths relative to src."""
    files = module_files(src)
    rel = {name: path.relative_to(src).as_posix() for name, path in files.items()}
    graph: dict[str, dict[str, list[int]]] = {}
    for module, path in files.items():
        edges: dict[str, set[int]] = {}
        tree = ast.parse(path.read_text(), filename=str(path))
        for target, name, line in imported_names(tree, module, path.name == "__init__.py"):
            if name is not None and f"{target}.{name}" in files:
                target = f"{target}.{name}"  # `from package import submodule`
            if target not in files or target == module:
                continue
            edges.setdefault(rel[target], set()).add(line)
        graph[rel[module]] = {target: sorted(lines) for target, lines in edges.items()}
    return graph


def cycles(graph: dict[str, dict[str, list[int]]]) -> list[tuple[str, ...]]:
    """Every elementary cycle, each once, as (first file, ..., last file) starting at its smallest file.

    For each file s in order, a depth-first search over the files after s finds the paths from s back to s;
    the graph is small (a few hundred files, sparse), so this plain search is fast enough.
    """
    found: list[tuple[str, ...]] = []
    for start in sorted(graph):
        _paths_back(graph, start, [start], found)
    return found


def _paths_back(graph: dict[str, dict[str, list[int]]], start: str, path: list[str], found: list) -> None:
    """Extend ``path`` (from ``start``) over files after ``start``; record each path that closes on ``start``."""
    for nxt in sorted(graph.get(path[-1], {})):
        if nxt == start:
            found.append(tuple(path))
        elif nxt > start and nxt not in path:
            _paths_back(graph, start, path + [nxt], found)


def describe(cycle: tuple[str, ...], graph: dict[str, dict[str, list[int]]]) -> str:
    """``a.py -> b.py (line 12) -> a.py (line 3)``: each arrow with the importing line(s)."""
    steps = [cycle[0]]
    for a, b in zip(cycle, cycle[1:] + cycle[:1]):
        steps.append(f"{b} (line {', '.join(map(str, graph[a][b]))} of {a.rsplit('/', 1)[-1]})")
    return " -> ".join(steps)


def layer_violations(graph: dict[str, dict[str, list[int]]]) -> dict[tuple[str, str], list[int]]:
    """(core file, application file) -> lines, for every import from a core room into an application room."""
    def room(path: str) -> str:
        parts = path.split("/")
        return parts[1] if len(parts) > 2 else ""

    return {(a, b): lines for a, edges in graph.items() if room(a) in CORE
            for b, lines in edges.items() if room(b) in APPLICATION}


# ----------------------------------------------------------------------------- the checks
@pytest.fixture(scope="module")
def graph() -> dict[str, dict[str, list[int]]]:
    return import_graph()


def test_no_import_cycle_between_files(graph):
    found = cycles(graph)
    new = [c for c in found if c not in KNOWN_CYCLES]
    gone = [c for c in KNOWN_CYCLES if c not in found]
    message = []
    if new:
        message.append(f"{len(new)} import cycle(s) between files of src/attnlab:")
        message += [f"  {describe(c, graph)}" for c in new]
    if gone:
        message.append("allow-listed cycle(s) no longer exist; remove them from KNOWN_CYCLES:")
        message += [f"  {' -> '.join(c + c[:1])}" for c in gone]
    if KNOWN_CYCLES and not gone:
        message.append("(still allow-listed: " + "; ".join(" -> ".join(c + c[:1]) for c in KNOWN_CYCLES) + ")")
    assert not new and not gone, "\n".join(message)


def test_core_rooms_import_nothing_from_the_application(graph):
    found = layer_violations(graph)
    new = {e: lines for e, lines in found.items() if e not in KNOWN_LAYER_VIOLATIONS}
    gone = [e for e in KNOWN_LAYER_VIOLATIONS if e not in found]
    message = [f"{a} imports {b} (line {', '.join(map(str, lines))}): {'/'.join(CORE)} must not import from "
               f"{'/'.join(APPLICATION)}" for (a, b), lines in new.items()]
    message += [f"allow-listed {a} -> {b} no longer exists; remove it from KNOWN_LAYER_VIOLATIONS" for a, b in gone]
    assert not new and not gone, "\n".join(message)


# ----------------------------------------------------------------------------- the checker itself
def write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / PACKAGE / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_checker_sees_function_level_relative_and_submodule_imports(tmp_path):
    """A cycle closed by a function-level relative import of a submodule is found and reported as a path."""
    src = write(tmp_path, {
        "__init__.py": "",
        "x/__init__.py": "from attnlab.x.a import f\n",
        "x/a.py": "import attnlab.x.b\ndef f():\n    pass\n",
        "x/b.py": "def g():\n    from . import c\n",
        "x/c.py": "from attnlab.x import a\n",
    })
    graph = import_graph(src)
    assert cycles(graph) == [("attnlab/x/a.py", "attnlab/x/b.py", "attnlab/x/c.py")]
    assert describe(cycles(graph)[0], graph) == (
        "attnlab/x/a.py -> attnlab/x/b.py (line 1 of a.py) -> attnlab/x/c.py (line 2 of b.py) "
        "-> attnlab/x/a.py (line 1 of c.py)")


def test_checker_package_init_rule(tmp_path):
    """An __init__ re-exporting its children is no cycle; a child importing a name from the __init__ is."""
    files = {
        "__init__.py": "",
        "p/__init__.py": "from attnlab.p.a import A\nfrom attnlab.p.b import B\n",
        "p/a.py": "A = 1\n",
        "p/b.py": "from attnlab.p.a import A\nB = A\n",
    }
    assert cycles(import_graph(write(tmp_path / "ok", files))) == []
    files["p/b.py"] = "from attnlab.p import A\nB = A\n"  # A looked up in the half-run __init__
    assert cycles(import_graph(write(tmp_path / "bad", files))) == [("attnlab/p/__init__.py", "attnlab/p/b.py")]


def test_checker_ignores_type_checking_imports_and_finds_layer_violations(tmp_path):
    src = write(tmp_path, {
        "__init__.py": "",
        "models/__init__.py": "",
        "models/m.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from attnlab.training import t\n"
                       "def load():\n    import importlib\n    return importlib.import_module('attnlab.tasks.k')\n",
        "training/__init__.py": "",
        "training/t.py": "from attnlab.models import m\n",
        "tasks/__init__.py": "",
        "tasks/k.py": "",
    })
    graph = import_graph(src)
    assert cycles(graph) == []
    assert layer_violations(graph) == {("attnlab/models/m.py", "attnlab/tasks/k.py"): [6]}


# ----------------------------------------------------------------------------- the architecture page
def layout_sections(page: str) -> dict[str, str]:
    """The tree drawn in docs/architecture.md (its first fenced block) cut into sections: each entry of the
    package (``layers/``, ``interop/gguf.py``, ``config.py``) with its continuation lines, keyed by its room
    (the first directory below the package, ``""`` for files at the top)."""
    block = page.split("```", 2)[1]
    sections: dict[str, str] = {}
    room = None
    for line in block.splitlines():
        entry = re.match(r"^  (\S+)", line)
        if entry:
            name = entry.group(1)
            room = name.split("/")[0] if "/" in name else ""
        if room is not None:
            sections[room] = sections.get(room, "") + line + "\n"
    return sections


def test_the_architecture_page_names_every_module_where_it_lives_and_nothing_else():
    """docs/architecture.md stays true: every module of the package is named (``name.py``) in the section of
    its room, and every ``name.py`` the tree names exists there (or at the package path it spells out)."""
    page = (SRC.parent / "docs" / "architecture.md").read_text()
    sections = layout_sections(page)
    package = SRC / PACKAGE
    missing, stale = [], []
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package)
        if path.name in ("__init__.py", "__main__.py"):
            continue
        room = rel.parts[0] if len(rel.parts) > 1 else ""
        if not re.search(rf"(?<![\w/]){re.escape(path.name)}\b", sections.get(room, "")) and \
                str(rel) not in "".join(sections.values()):
            missing.append(str(rel))
    for room, text in sections.items():
        for name in re.findall(r"(?<![\w.])([\w/]+\.py)\b", text):
            if "/" in name:
                exists = (package / name).is_file()
            else:
                exists = any((package / room).rglob(name)) if room else (package / name).is_file()
            if not exists:
                stale.append(f"{room or '(top)'}: {name}")
    assert missing == [] and stale == []
