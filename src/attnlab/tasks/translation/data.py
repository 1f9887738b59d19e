"""English -> Spanish translation data: the World English Bible and the Reina-Valera 1909, aligned by verse.

``build_dataset`` = fetch (``attnlab.tasks.translation.sword``) -> ``clean_verse`` -> ``align`` -> ``split_by_book`` ->
JSONL files + a byte-level BPE tokenizer + ``manifest.json``. Every step after the fetch is a pure
function, so tests run them on a few made-up verses.

Cleaning removes footnotes and cross-references (``<note>``), Strong's numbers (``<w lemma=...>`` keeps
its words), section headings and speaker labels, every other OSIS tag, the glossary that the English
module appends to Revelation 22:21, and the drop capitals of the Spanish chapter openings ("EN el
principio" -> "En el principio"); canonical psalm titles are kept (the Spanish text has them in verse 1).

Alignment keeps verses that are non-empty on both sides, then drops (a) whole chapters whose numbering is
shifted between the two versifications (NRSVA vs KJV: detected by verse lengths matching better one verse
off than in place), (b) single pairs whose length ratio is implausible. The split is by *book*, fixed
below, so no test verse comes from a book seen in training.
"""

from __future__ import annotations

import hashlib
import html
import json
import math
import re
import unicodedata
from pathlib import Path

from attnlab.atomic import atomic_write_text
from attnlab.tasks.translation.sword import PACKAGES, Verses
from attnlab.tokenizer import Tokenizer, train_bpe

SOURCE, TARGET = "en", "es"
SPECIALS = ("<pad>", "<s>", "</s>")  # ids 0, 1, 2: pad, decoder start, end (as attnlab.tasks.seq2seq_data)
BOOKS = ("Gen Exod Lev Num Deut Josh Judg Ruth 1Sam 2Sam 1Kgs 2Kgs 1Chr 2Chr Ezra Neh Esth Job Ps Prov Eccl "
         "Song Isa Jer Lam Ezek Dan Hos Joel Amos Obad Jonah Mic Nah Hab Zeph Hag Zech Mal Matt Mark Luke John "
         "Acts Rom 1Cor 2Cor Gal Eph Phil Col 1Thess 2Thess 1Tim 2Tim Titus Phlm Heb Jas 1Pet 2Pet 1John 2John "
         "3John Jude Rev").split()
# held-out books: narrative, wisdom and letters; none of them has a near-parallel book left in training
# except by theme (the synoptic gospels, Kings/Chronicles and Jude/2 Peter all stay together in train)
VALIDATION_BOOKS = ("Ruth", "Lam", "Jonah", "Phil", "Jas")
TEST_BOOKS = ("Josh", "Eccl", "Rom", "1Pet")
RATIO_RANGE = (0.4, 2.5)  # kept: (len(target) + 10) / (len(source) + 10) in characters, within this range
CLEANING_VERSION = 1  # bump when cleaning or alignment changes (recorded in the manifest)

_CUT = re.compile(r"<div\b[^>]*type=\"(?:glossary|introduction)\".*", re.S)  # back matter after the last verse
_NOTE = re.compile(r"<note\b[^>]*>.*?</note>", re.S)
_NOTE_EMPTY = re.compile(r"<note\b[^>]*/>")
_LABELS = re.compile(r"<(speaker|title)\b(?![^>]*canonical=\"true\")[^>]*>.*?</\1>", re.S)
_TAG = re.compile(r"<[^>]*>")
_GAP = "\x00"  # where a note or label stood: a space between two words, nothing next to punctuation
_CAPS = re.compile(r"^([¡¿(\"“‘]?)([A-ZÁÉÍÓÚÑÜ]{2,})(?=[\s,;:.!?]+[A-ZÁÉÍÓÚÑÜ]?[a-záéíóúñü])")


def clean_verse(raw: str) -> str:
    """OSIS markup -> plain text (NFC, single spaces)."""
    text = _CUT.sub("", raw)
    text = _NOTE_EMPTY.sub("", _NOTE.sub(_GAP, text))
    text = _LABELS.sub(_GAP, text)
    text = html.unescape(_TAG.sub("", text))
    text = re.sub(f"(?<=[\\w.,;:!?’”]){_GAP}+(?=[\\w“‘¿¡(])", " ", text).replace(_GAP, "")
    return unicodedata.normalize("NFC", re.sub(r"\s+", " ", text).strip())


def fix_drop_capital(text: str) -> str:
    """"EN el principio" -> "En el principio"; "Y YO me paré" -> "Y yo me paré" (the first words only)."""
    words = text.split(" ")
    for i in range(min(3, len(words))):
        rest = " ".join(words[i:])
        m = _CAPS.match(rest)
        if m:
            word = m.group(2)
            sentence_start = i == 0 or words[i - 1].endswith((".", "!", "?", ":"))
            word = word.capitalize() if sentence_start else word.lower()
            words[i] = m.group(1) + word + words[i][len(m.group(0)):]
            break
    return " ".join(words)


def _cost(src: str, tgt: str, ratio: float) -> float:
    return abs(math.log((len(tgt) + 10) / (len(src) + 10) / ratio))


def shifted_chapters(src: dict[tuple[str, int, int], str], tgt: dict[tuple[str, int, int], str],
                     ratio: float, *, margin: float = 0.8, worst: float = 0.3) -> set[tuple[str, int]]:
    """Chapters whose verses fit better one verse off than in place (or fit badly at all)."""
    chapters: dict[tuple[str, int], int] = {}
    for book, chapter, verse in tgt:
        chapters[(book, chapter)] = max(chapters.get((book, chapter), 0), verse)
    out = set()
    for (book, chapter), n in chapters.items():
        costs = {}
        for off in (-1, 0, 1):
            pairs = [(src.get((book, chapter, v), ""), tgt.get((book, chapter, v + off), "")) for v in range(1, n + 1)]
            pairs = [(a, b) for a, b in pairs if a and b]
            costs[off] = sum(_cost(a, b, ratio) for a, b in pairs) / len(pairs) if len(pairs) >= 3 else None
        if costs[0] is None:
            continue
        others = [c for c in (costs[-1], costs[1]) if c is not None]
        if costs[0] > worst or (others and min(others) < margin * costs[0]):
            out.add((book, chapter))
    return out


def align(source: Verses, target: Verses) -> tuple[list[dict], dict]:
    """Cleaned verse dicts -> pairs {"id", "book", "en", "es"} in canonical order, and what was dropped."""
    keys = sorted((k for k in source.keys() | target.keys() if k[0] in BOOKS),
                  key=lambda k: (BOOKS.index(k[0]), k[1], k[2]))
    both = [k for k in keys if source.get(k) and target.get(k)]
    ratios = sorted((len(target[k]) + 10) / (len(source[k]) + 10) for k in both)
    ratio = ratios[len(ratios) // 2] if ratios else 1.0
    shifted = shifted_chapters({k: source[k] for k in both}, {k: target[k] for k in both}, ratio)
    pairs, bad_ratio = [], 0
    for k in both:
        if (k[0], k[1]) in shifted:
            continue
        r = (len(target[k]) + 10) / (len(source[k]) + 10)
        if not RATIO_RANGE[0] <= r <= RATIO_RANGE[1]:
            bad_ratio += 1
            continue
        pairs.append({"id": f"{k[0]}.{k[1]}.{k[2]}", "book": k[0], SOURCE: source[k], TARGET: target[k]})
    report = {"verses": len(keys), "one_sided_or_empty": len(keys) - len(both),
              "shifted_chapters": sorted(f"{b} {c}" for b, c in shifted),
              "dropped_in_shifted_chapters": sum(1 for k in both if (k[0], k[1]) in shifted),
              "dropped_length_ratio": bad_ratio, "median_length_ratio": round(ratio, 4)}
    return pairs, report


def split_by_book(pairs: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {"train": [], "validation": [], "test": []}
    for p in pairs:
        out["test" if p["book"] in TEST_BOOKS else "validation" if p["book"] in VALIDATION_BOOKS else "train"].append(p)
    return out


def prepare(raw_source: Verses, raw_target: Verses) -> tuple[dict[str, list[dict]], dict]:
    """Raw OSIS verses of both sides -> (splits, alignment report): clean, align, split."""
    src = {k: clean_verse(v) for k, v in raw_source.items()}
    tgt = {k: fix_drop_capital(clean_verse(v)) for k, v in raw_target.items()}
    pairs, report = align(src, tgt)
    return split_by_book(pairs), report


def jsonl(pairs: list[dict]) -> str:
    return "".join(json.dumps(p, ensure_ascii=False, sort_keys=True) + "\n" for p in pairs)


def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    """Joint byte-level BPE (no unknown token: any character is its UTF-8 bytes) with <pad> <s> </s> first."""
    return train_bpe(texts, vocab_size, specials=SPECIALS, pad_token=SPECIALS[0], bos_token=SPECIALS[1],
                     eos_token=SPECIALS[2])


def write_dataset(out: str | Path, splits: dict[str, list[dict]], report: dict, *, vocab_size: int = 8000,
                  versions: dict[str, str] | None = None) -> dict:
    """Write train/validation/test.jsonl, tokenizer.json and manifest.json into ``out``; return the manifest.

    Each file goes to a temporary name and is renamed into place, the manifest last (a directory without
    it is not a finished dataset). ``out`` may be new, empty, or a dataset this function wrote before
    (its manifest says so); files of the same names that something else wrote are refused, untouched."""
    out = Path(out)
    check_dataset_target(out, [f"{name}.jsonl" for name in splits])
    out.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    for name, pairs in splits.items():
        text = jsonl(pairs)
        digest.update(f"{name}\n".encode() + text.encode())
        atomic_write_text(out / f"{name}.jsonl", text)
    tok = train_tokenizer([p[lang] for p in splits["train"] for lang in (SOURCE, TARGET)], vocab_size)
    tok.save(out)
    stats = {}
    for name, pairs in splits.items():
        n_src = [len(ids) for ids in tok.encode_batch([p[SOURCE] for p in pairs])]
        n_tgt = [len(ids) for ids in tok.encode_batch([p[TARGET] for p in pairs])]
        stats[name] = {"pairs": len(pairs), "books": sorted({p["book"] for p in pairs}, key=BOOKS.index),
                       f"{SOURCE}_bytes": sum(len(p[SOURCE].encode()) for p in pairs),
                       f"{TARGET}_bytes": sum(len(p[TARGET].encode()) for p in pairs),
                       f"{SOURCE}_tokens_mean": round(sum(n_src) / max(1, len(n_src)), 2),
                       f"{TARGET}_tokens_mean": round(sum(n_tgt) / max(1, len(n_tgt)), 2),
                       "longest_tokens": max(n_src + n_tgt, default=0),
                       "pairs_over_128_tokens": sum(max(a, b) > 128 for a, b in zip(n_src, n_tgt))}
    manifest = {"task": "translation", "source": SOURCE, "target": TARGET,
                "packages": {pkg: (versions or {}).get(pkg) for pkg, _ in PACKAGES.values()},
                "modules": {lang: module for lang, (_, module) in PACKAGES.items()},
                "cleaning_version": CLEANING_VERSION, "pairs_sha256": digest.hexdigest(),
                "tokenizer": {"kind": "byte-level BPE, joint", "vocab_size": tok.vocab_size,
                              "specials": list(SPECIALS)},
                "validation_books": list(VALIDATION_BOOKS), "test_books": list(TEST_BOOKS),
                "alignment": report, "splits": stats}
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
    return manifest


MANIFEST = "manifest.json"


def check_dataset_target(out: Path, names: list[str]) -> None:
    """Raise ``ValueError`` if writing the dataset into ``out`` would replace files it did not write."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file, not a directory; choose another --out")
    manifest = out / MANIFEST
    if manifest.is_file():
        try:
            ours = json.loads(manifest.read_text(encoding="utf-8")).get("task") == "translation"
        except (ValueError, UnicodeDecodeError, AttributeError):
            ours = False
        if ours:
            return
    clash = sorted(n for n in [*names, "tokenizer.json", "special_tokens.json", MANIFEST] if (out / n).exists())
    if clash:
        raise ValueError(f"{out} holds {', '.join(clash)}, not written by `attnlab data translation`; nothing was "
                         f"changed — choose a new or empty --out directory")


def build_dataset(out: str | Path, *, cache: str | Path | None = None, vocab_size: int = 8000) -> dict:
    """``attnlab data translation``: fetch (cached), read, prepare and write the dataset."""
    from attnlab.tasks.translation.sword import fetch, read_module

    root, versions = fetch(cache)
    raw = {lang: read_module(root, module) for lang, (_, module) in PACKAGES.items()}
    splits, report = prepare(raw[SOURCE], raw[TARGET])
    return write_dataset(out, splits, report, vocab_size=vocab_size, versions=versions)


def load_split(data_dir: str | Path, split: str) -> list[dict]:
    path = Path(data_dir) / f"{split}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no {path}: make the dataset first with `attnlab data translation --out {data_dir}`")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
