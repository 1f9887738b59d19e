"""Text corpora: the built-in default (this machine's Python standard library sources) or the user's files.

The default corpus needs no download: ``sysconfig.get_paths()["stdlib"]`` holds tens of MB of real Python
that nobody here wrote. Files are split deterministically *by file* (a hash of the relative path) into
train / validation / test, so no file is seen in two splits. ``--data PATH`` takes a text file, a folder
of text files (recursively: .txt .md .py .rst .json ... anything that decodes as UTF-8), or JSONL with a
"text" field per line; user files are split by the same hash rule.
"""

from __future__ import annotations

import hashlib
import json
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

SPLITS = ("train", "validation", "test")
TEXT_SUFFIXES = {".txt", ".md", ".py", ".rst", ".json", ".csv", ".html", ".c", ".h", ".js", ".ts", ".toml", ".yaml",
                 ".yml", ".cfg", ".ini", ".tex", ".xml", ".sh"}
SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}  # third-party code is not the stdlib


@dataclass
class Corpus:
    """Documents (one string per file or JSONL record) per split, plus where they came from."""

    name: str
    documents: dict[str, list[str]] = field(default_factory=dict)
    sources: dict[str, list[str]] = field(default_factory=dict)  # per split: "path" or "path:line"

    def fingerprint(self) -> str:
        """Changes whenever any source or its content changes (used to invalidate token caches)."""
        h = hashlib.sha256(self.name.encode())
        for split in SPLITS:
            for src, doc in zip(self.sources.get(split, []), self.documents.get(split, [])):
                h.update(f"{split}\0{src}\0{len(doc)}\0".encode())
                h.update(hashlib.sha256(doc.encode()).digest())
        return h.hexdigest()[:20]

    def n_bytes(self, split: str) -> int:
        return sum(len(d.encode()) for d in self.documents.get(split, []))


def split_of(key: str, validation: float = 0.05, test: float = 0.05) -> str:
    h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") / 2**64
    return "test" if h < test else ("validation" if h < test + validation else "train")


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text; remove it or convert it (iconv -t utf-8)") from None
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror}; check its permissions") from None


def _add(corpus: Corpus, key: str, text: str) -> None:
    if not text.strip():
        return
    split = split_of(key)
    corpus.documents.setdefault(split, []).append(text)
    corpus.sources.setdefault(split, []).append(key)


def stdlib_corpus(max_files: int | None = None) -> Corpus:
    """The Python standard library's .py files on this machine (its own test suite included; installed
    third-party packages excluded)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    corpus = Corpus(name=f"stdlib:{root}")
    files = sorted(p for p in root.rglob("*.py") if not (set(p.relative_to(root).parts[:-1]) & SKIP_DIRS))
    for path in files[:max_files]:
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # a handful of stdlib files are deliberately not UTF-8 (encoding tests)
        _add(corpus, str(path.relative_to(root)), text)
    if not corpus.documents.get("train"):
        raise ValueError(f"no Python sources found under {root}; pass your own text with --data PATH")
    return corpus


def user_corpus(path: str | Path) -> Corpus:
    """A text file, a folder of text files, or a JSONL file with a "text" field."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"--data {path}: no such file or folder")
    corpus = Corpus(name=f"data:{path.resolve()}")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
        if not files:
            raise ValueError(f"--data {path}: the folder holds no text files ({', '.join(sorted(TEXT_SUFFIXES))})")
        for f in files:
            _add(corpus, str(f.relative_to(path)), _read_text(f))
    elif path.suffix.lower() == ".jsonl":
        for n, line in enumerate(_read_text(path).splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{n}: not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise ValueError(f'{path}:{n}: each JSONL line needs a "text" string field')
            _add(corpus, f"{path.name}:{n}", record["text"])
    else:
        text = _read_text(path)
        # one file: split it by blank-line-separated chunks of ~4 KB so all three splits get text
        chunk, size, n = [], 0, 0
        for para in text.split("\n\n"):
            chunk.append(para)
            size += len(para)
            if size > 4096:
                _add(corpus, f"{path.name}#{n}", "\n\n".join(chunk))
                chunk, size, n = [], 0, n + 1
        if chunk:
            _add(corpus, f"{path.name}#{n}", "\n\n".join(chunk))
    if not corpus.documents.get("train"):
        raise ValueError(f"--data {path}: the corpus is empty (no non-blank text for the training split)")
    for split in SPLITS:
        corpus.documents.setdefault(split, [])
        corpus.sources.setdefault(split, [])
    if not corpus.documents["validation"]:  # tiny corpora: borrow the last training document for validation
        corpus.documents["validation"] = corpus.documents["train"][-1:]
        corpus.sources["validation"] = corpus.sources["train"][-1:]
    return corpus


def load_corpus(data: str | Path | None = None, *, max_files: int | None = None) -> Corpus:
    corpus = stdlib_corpus(max_files) if data is None else user_corpus(data)
    for split in SPLITS:
        corpus.documents.setdefault(split, [])
        corpus.sources.setdefault(split, [])
    return corpus
