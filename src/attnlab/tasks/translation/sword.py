"""Fetching and reading the two Bible texts of the translation task, packaged by Debian as SWORD modules.

- ``sword-text-web``: the World English Bible (module ``engWEB2015eb``, NRSVA versification), public domain;
- ``sword-text-sparv``: the Spanish Reina-Valera 1909 (module ``spaRV1909eb``, KJV versification), public domain.

``fetch`` runs ``apt-get download`` into a cache folder (no root install: the .deb files are only unpacked
there with ``dpkg-deb -x``); ``read_module`` reads every verse's raw OSIS markup with the ``pysword``
package. Cleaning and alignment are pure functions in ``attnlab.tasks.translation.data``.
"""

from __future__ import annotations

import functools
import shutil
import subprocess
from pathlib import Path

from attnlab.atomic import atomic_write_text
from attnlab.cachedir import cache_dir

# language -> (Debian package, SWORD module inside it)
PACKAGES: dict[str, tuple[str, str]] = {"en": ("sword-text-web", "engWEB2015eb"),
                                        "es": ("sword-text-sparv", "spaRV1909eb")}

Verses = dict[tuple[str, int, int], str]  # (OSIS book, chapter, verse) -> text


class FetchError(ValueError):
    """The Debian packages could not be fetched or unpacked (the message holds the command to run by hand)."""


def default_cache() -> Path:
    """``$ATTNLAB_CACHE/translation``, else ``~/.cache/attnlab/translation``."""
    return cache_dir("translation")


def _manual(cache: Path) -> str:
    names = " ".join(pkg for pkg, _ in PACKAGES.values())
    return (f"fetch them by hand, then run the command again:\n"
            f"  mkdir -p {cache / 'debs'} && cd {cache / 'debs'} && apt-get download {names}\n"
            f"(run `apt-get update` first if apt cannot find them; any Debian/Ubuntu machine can fetch the two "
            f".deb files, which you may copy into {cache / 'debs'})")


def _deb(debs: Path, package: str) -> Path | None:
    found = sorted(debs.glob(f"{package}_*.deb"))
    return found[-1] if found else None


def version_of(deb: Path) -> str:
    """``sword-text-web_426.0-1_all.deb`` -> ``426.0-1``."""
    parts = deb.name.split("_")
    return parts[1] if len(parts) >= 3 else "unknown"


def fetch(cache: str | Path | None = None) -> tuple[Path, dict[str, str]]:
    """Download (once) and unpack both packages; return (SWORD library root, {package: version})."""
    cache = Path(cache).expanduser() if cache else default_cache()
    debs = cache / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    missing = [pkg for pkg, _ in PACKAGES.values() if _deb(debs, pkg) is None]
    if missing:
        if shutil.which("apt-get") is None:
            raise FetchError(f"cannot fetch the Debian packages {', '.join(missing)}: apt-get is not on this "
                             f"machine; " + _manual(cache))
        try:
            run = subprocess.run(["apt-get", "download", *missing], cwd=debs, capture_output=True, text=True,
                                 timeout=600)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise FetchError(f"`apt-get download {' '.join(missing)}` failed ({exc}); " + _manual(cache)) from None
        still = [pkg for pkg in missing if _deb(debs, pkg) is None]
        if run.returncode != 0 or still:
            detail = (run.stderr or run.stdout).strip().splitlines()
            raise FetchError(f"`apt-get download {' '.join(missing)}` failed"
                             f"{': ' + detail[-1] if detail else ''}; " + _manual(cache))
    root = cache / "sword"
    versions = {}
    for package, module in PACKAGES.values():
        deb = _deb(debs, package)
        assert deb is not None
        versions[package] = version_of(deb)
        unpacked = root / f".{deb.name}.unpacked"  # marks a complete extraction of this exact file
        if unpacked.is_file() and _conf(root, module).is_file():
            continue
        if shutil.which("dpkg-deb") is None:
            raise FetchError(f"cannot unpack {deb}: dpkg-deb is not on this machine (install the `dpkg` package)")
        run = subprocess.run(["dpkg-deb", "-x", str(deb), str(cache / "extract")], capture_output=True, text=True)
        if run.returncode != 0:
            raise FetchError(f"`dpkg-deb -x {deb}` failed: {run.stderr.strip()}; delete it and fetch again")
        src = cache / "extract" / "usr" / "share" / "sword"
        shutil.copytree(src, root, dirs_exist_ok=True)
        shutil.rmtree(cache / "extract", ignore_errors=True)
        atomic_write_text(unpacked, versions[package] + "\n")  # the marker appears whole, after the copy
    return root, versions


def _conf(root: Path, module: str) -> Path:
    return root / "mods.d" / f"{module}.conf"


def read_module(root: str | Path, module: str) -> Verses:
    """Every verse of a SWORD Bible module as raw OSIS markup, in the module's canonical order."""
    try:
        from pysword.modules import SwordModules
    except ImportError:
        raise ValueError("reading the SWORD modules needs the `pysword` package: pip install pysword "
                         "(`make install` brings it)") from None

    library = SwordModules(str(root))
    found = library.parse_modules()
    if module not in found:
        raise FileNotFoundError(f"no SWORD module {module!r} in {root} (found: {', '.join(found) or 'none'}); "
                                f"delete {root} and fetch again")
    bible = library.get_bible_from_module(module)
    # BlockType=BOOK: pysword decompresses a whole book for every verse; keep the last few in memory
    if hasattr(bible, "_decompressed_text"):
        bible._decompressed_text = functools.lru_cache(maxsize=4)(bible._decompressed_text)
    verses: Verses = {}
    for testament in bible.get_structure().get_books().values():
        for book in testament:
            for chapter, n_verses in enumerate(book.chapter_lengths, 1):
                texts = list(bible.get_iter(books=[book.osis_name], chapters=[chapter], clean=False))
                if len(texts) != n_verses:  # a z-text module yields one text per verse, empty or not
                    raise ValueError(f"{module} {book.osis_name} {chapter}: {len(texts)} texts for {n_verses} verses")
                for verse, text in enumerate(texts, 1):
                    verses[(book.osis_name, chapter, verse)] = text
    return verses
