"""Nothing lost, held in the code itself: every file the package writes goes through the atomic writers
(``attnlab/atomic.py`` for files, ``checkpoint.atomic_write_dir`` for model directories: a temporary name
beside the target, then a rename), so a crash at any moment leaves the previous file or the new one, never
half of one.

The check parses every module with ``ast`` and finds each call that writes a file (``Path.write_text`` /
``write_bytes``, ``open`` for writing, ``savefig``, ``torch.save``, safetensors' ``save_file``, ``np.save``,
``json.dump``, ``tofile``, a tokenizer backend's ``save``). A write is in order when it fills the temporary
path handed out by the writer: it sits inside a ``lambda`` or a function that the same module passes to
``atomic_write_file`` / ``atomic_write_dir``. The few other writes are listed below, each with its reason; the
list fails when an entry goes stale, so it cannot hide a write that has gone.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "attnlab"
WRITERS = {"atomic_write_file", "atomic_write_dir"}
WRITE_METHODS = {"write_text", "write_bytes", "savefig", "tofile"}
WRITE_FUNCTIONS = {("torch", "save"), ("np", "save"), ("numpy", "save"), ("json", "dump")}

# (file, what) -> why this write needs no temporary name
ALLOWED: dict[tuple[str, str], str] = {
    ("training/trainer.py", "open"): "metrics.jsonl is an append-only log, one short write per record; the one "
                                      "damage a crash leaves, a torn last line, is dropped by its reader "
                                      "(trainer.metric_records, tested in reliability/test_resume.py)",
    ("memstats.py", "open"): "/proc/self/clear_refs: a kernel control file, not data",
    ("bench/common.py", "write_text"): "/proc/self/clear_refs: a kernel control file, not data",
    ("bench/attention.py", "open"): "/proc/self/clear_refs: a kernel control file, not data",
    ("figures.py", "savefig"): "renders into memory; the bytes go through atomic_write_file",
}


def _call_name(call: ast.Call) -> str | None:
    f = call.func
    if isinstance(f, ast.Attribute):
        if isinstance(f.value, ast.Name) and (f.value.id, f.attr) in WRITE_FUNCTIONS:
            return f"{f.value.id}.{f.attr}"
        if f.attr in WRITE_METHODS or f.attr == "save_file":
            return f.attr
    if isinstance(f, ast.Name):
        if f.id == "save_file":
            return "save_file"
        if f.id == "open":
            mode = call.args[1] if len(call.args) > 1 else next((k.value for k in call.keywords if k.arg == "mode"), None)
            if isinstance(mode, ast.Constant) and isinstance(mode.value, str) and set(mode.value) & set("wax+"):
                return "open"
    return None


def unguarded_writes(source: str) -> list[tuple[str, int]]:
    """(what, line) of every file write in ``source`` that is not inside a callback given to an atomic writer."""
    tree = ast.parse(source)
    passed: set[str] = set()  # names of functions handed to an atomic writer
    guarded: set[int] = set()  # ids of lambda/def nodes handed to one
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, (ast.Name, ast.Attribute)):
            name = node.func.id if isinstance(node.func, ast.Name) else node.func.attr
            if name in WRITERS:
                for arg in node.args[1:] + [k.value for k in node.keywords]:
                    if isinstance(arg, ast.Lambda):
                        guarded.add(id(arg))
                    elif isinstance(arg, ast.Name):
                        passed.add(arg.id)
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name in passed:
            guarded.add(id(node))
    found: list[tuple[str, int]] = []

    def visit(node: ast.AST, inside: bool) -> None:
        inside = inside or id(node) in guarded
        if isinstance(node, ast.Call) and not inside:
            what = _call_name(node)
            if what is not None:
                found.append((what, node.lineno))
        for child in ast.iter_child_nodes(node):
            visit(child, inside)

    visit(tree, False)
    return found


def test_every_file_the_package_writes_goes_through_the_atomic_writer():
    seen, unguarded = set(), []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = str(path.relative_to(PACKAGE))
        for what, line in unguarded_writes(path.read_text()):
            if (rel, what) in ALLOWED:
                seen.add((rel, what))
            else:
                unguarded.append(f"{rel}:{line} {what}")
    assert unguarded == []
    assert sorted(set(ALLOWED) - seen) == []  # a listed exception that no longer exists


def test_the_checker_tells_a_guarded_write_from_a_bare_one():
    source = '''
def save(path, data, fig):
    atomic_write_file(path, lambda tmp: tmp.write_bytes(data))
    def fill(tmp):
        with open(tmp / "a", "w") as f:
            json.dump(data, f)
    atomic_write_dir(path, fill)
    path.write_text("x")
    with open(path, "rb") as f:
        pass
    fig.savefig(path)
    torch.save(data, path)
'''
    assert unguarded_writes(source) == [("write_text", 8), ("savefig", 11), ("torch.save", 12)]
