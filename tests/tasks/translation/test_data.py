import json
import os
import shutil

import pytest

from attnlab.tasks.translation import sword
from attnlab.tasks.translation.data import (
    TEST_BOOKS,
    VALIDATION_BOOKS,
    align,
    clean_verse,
    fix_drop_capital,
    prepare,
    shifted_chapters,
    train_tokenizer,
    write_dataset,
)

# raw verses as the Debian modules hold them (engWEB2015eb 426.0, spaRV1909eb 2.60), abridged
REAL = {
    "footnote and Strong's numbers": (
        '<w lemma="strong:H0430">In</w> <w lemma="strong:H0853">the</w> <w lemma="strong:H7225">beginning</w>, '
        '<w lemma="strong:H0430">God</w><note placement="foot"><reference type="annotateRef">1:1 </reference>The '
        'Hebrew word rendered “God” is “אֱלֹהִ֑ים” (Elohim).</note><w lemma="strong:H1254">created</w> '
        '<w lemma="strong:H0853">the</w> <w lemma="strong:H8064">heavens</w>. <div eID="gen25" type="x-p"/>',
        "In the beginning, God created the heavens."),
    "canonical psalm title kept, poetry milestones dropped": (
        '<div type="x-milestone" subType="x-preverse" sID="pv4877"/><title canonical="true" type="psalm">A Psalm by '
        'David.</title> <lg sID="gen7860"/> <l level="1" sID="gen7861"/><div type="x-milestone" subType="x-preverse" '
        'eID="pv4877"/>Yahweh, how <w lemma="strong:H1732">my</w> adversaries increased!<l eID="gen7861" level="1"/>',
        "A Psalm by David. Yahweh, how my adversaries increased!"),
    "speaker label dropped": (
        '<speaker>Beloved</speaker> <lg sID="gen15617"/> <l level="1" sID="gen15618"/>Let him kiss me;<l '
        'eID="gen15618" level="1"/>', "Let him kiss me;"),
    "cross-reference note and quotation": (
        '<q marker="" who="Jesus">“God with us.”</q><note type="crossReference"><reference subType="x-origin" '
        'type="annotateRef">1:23 </reference><reference>Isaiah 7:14</reference></note> <l eID="gen30291" level="2"/>',
        "“God with us.”"),
    "glossary after the last verse cut": (
        'Amen.  <chapter eID="Rev.22"/><div eID="gen35836" type="x-p"/> <div canonical="true" eID="gen35575" '
        'osisID="Rev" type="book"/> <div sID="gen35837" type="glossary"/> <title level="1" type="main">World '
        'English Bible Glossary</title> <div sID="gen35838" type="introduction"/> Abba: Father', "Amen."),
    "note before punctuation leaves no space": (
        'let him<note placement="foot"><reference type="annotateRef">17:27 </reference>Hebrew: <catchWord>them'
        '</catchWord></note> go, and the law<note placement="foot">x</note>.', "let him go, and the law."),
    "Spanish added words kept": (
        '<w lemma="strong:G1063">Porque</w> <w lemma="strong:G0846">á su</w> <transChange type="added">Hijo'
        '</transChange> &amp; vida.', "Porque á su Hijo & vida."),
}


@pytest.mark.parametrize("case", sorted(REAL))
def test_clean_verse_on_real_markup(case):
    raw, expected = REAL[case]
    assert clean_verse(raw) == expected


@pytest.mark.parametrize("text, expected", [
    ("EN el principio crió Dios", "En el principio crió Dios"),
    ("¡OH Jehová, cuánto", "¡Oh Jehová, cuánto"),
    ("Y YO me paré sobre la arena", "Y yo me paré sobre la arena"),
    ("ALEPH. BIENAVENTURADOS los perfectos", "ALEPH. Bienaventurados los perfectos"),
    ("Y dijo Dios: Sea la luz", "Y dijo Dios: Sea la luz"),
    ("Y escribieron: JESÚS NAZARENO, REY DE LOS JUDÍOS", "Y escribieron: JESÚS NAZARENO, REY DE LOS JUDÍOS"),
])
def test_fix_drop_capital(text, expected):
    assert fix_drop_capital(text) == expected


def test_prepare_is_deterministic_and_splits_by_book(raw_verses):
    en, es = raw_verses
    a, report_a = prepare(en, es)
    b, report_b = prepare(dict(reversed(list(en.items()))), dict(reversed(list(es.items()))))  # order-free
    assert a == b and report_a == report_b
    books = {split: {p["book"] for p in pairs} for split, pairs in a.items()}
    assert books == {"train": {"Gen", "Matt"}, "validation": {"Ruth", "Jas"}, "test": {"Josh", "Rom"}}
    assert books["test"] <= set(TEST_BOOKS) and books["validation"] <= set(VALIDATION_BOOKS)
    ids = [p["id"] for pairs in a.values() for p in pairs]
    assert len(ids) == len(set(ids)) and "Gen.1.5" not in ids and "Gen.2.9" not in ids  # one-sided verses
    assert not any(i.startswith("Tob.") for i in ids)
    gen = {p["id"]: p for p in a["train"]}
    assert gen["Gen.1.2"] == {"id": "Gen.1.2", "book": "Gen", "en": "God created the light.", "es": "Dios crió la luz."}
    assert all(p["es"][0].isupper() and not p["es"].split()[0][1:].isupper() for p in a["train"] if p["id"].endswith(".1"))
    assert report_a["one_sided_or_empty"] == 2 and report_a["shifted_chapters"] == []


def test_shifted_chapter_is_dropped():
    lengths = [5, 40, 9, 60, 7, 33, 12, 50, 6, 28]
    src = {("Gen", 3, v): "x" * n for v, n in enumerate(lengths, 1)}
    tgt = {("Gen", 3, v): "y" * n for v, n in enumerate(lengths[1:], 1)}  # Spanish verse v = English v + 1
    tgt.update({("Gen", 4, v): "y" * n for v, n in enumerate(lengths, 1)})
    src.update({("Gen", 4, v): "x" * n for v, n in enumerate(lengths, 1)})
    assert shifted_chapters(src, tgt, 1.0) == {("Gen", 3)}
    pairs, report = align(src, tgt)
    assert {p["id"].rsplit(".", 1)[0] for p in pairs} == {"Gen.4"} and report["shifted_chapters"] == ["Gen 3"]


def test_written_dataset_is_deterministic(raw_verses, tmp_path):
    manifests = []
    for name in ("a", "b"):
        splits, report = prepare(*raw_verses)
        manifests.append(write_dataset(tmp_path / name, splits, report, vocab_size=300))
    for file in ("train.jsonl", "validation.jsonl", "test.jsonl", "tokenizer.json", "manifest.json"):
        assert (tmp_path / "a" / file).read_bytes() == (tmp_path / "b" / file).read_bytes(), file
    m = manifests[0]
    assert m["splits"]["test"]["books"] == ["Josh", "Rom"] and m["tokenizer"]["vocab_size"] <= 300
    assert json.loads((tmp_path / "a" / "train.jsonl").read_text().splitlines()[0])["id"] == "Gen.1.1"


def test_a_dataset_replaces_its_own_files_but_never_someone_elses(raw_verses, tmp_path):
    splits, report = prepare(*raw_verses)
    write_dataset(tmp_path / "ds", splits, report, vocab_size=300)
    write_dataset(tmp_path / "ds", splits, report, vocab_size=300)  # a dataset made again in its own directory
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "train.jsonl").write_text("the user's own file\n")
    with pytest.raises(ValueError, match="train.jsonl, not written by"):
        write_dataset(theirs, splits, report, vocab_size=300)
    assert (theirs / "train.jsonl").read_text() == "the user's own file\n"
    assert sorted(p.name for p in theirs.iterdir()) == ["train.jsonl"]  # nothing else written either


def test_tokenizer_has_specials_first_and_no_unknown_characters():
    tok = train_tokenizer(["the light of day", "la luz del día"] * 20, 280)
    assert [tok.token_to_id(s) for s in ("<pad>", "<s>", "</s>")] == [0, 1, 2]
    text = "Ωmega 😀 中文 ñandú"
    ids = tok.encode(text)
    assert min(ids) > 2 and tok.decode(ids) == text
    with pytest.raises(ValueError, match="vocab-size"):
        train_tokenizer(["x"], 100)


def test_fetch_without_apt_names_the_packages_and_the_command(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(sword.FetchError) as err:
        sword.fetch(tmp_path)
    msg = str(err.value)
    assert "sword-text-web" in msg and "sword-text-sparv" in msg
    assert "apt-get download sword-text-web sword-text-sparv" in msg and str(tmp_path / "debs") in msg


def test_fetch_reports_a_failing_apt_get(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "apt-get"
    fake.write_text("#!/bin/sh\necho 'E: Unable to locate package sword-text-web' >&2\nexit 100\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(sword.FetchError, match="(?s)Unable to locate package.*apt-get download"):
        sword.fetch(tmp_path / "cache")


def test_default_cache_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNLAB_CACHE", str(tmp_path))
    assert sword.default_cache() == tmp_path / "translation"


@pytest.mark.slow
def test_real_modules_give_about_31000_pairs(tmp_path):
    """The real Debian packages (fetched into the default cache, or skipped when that cannot happen)."""
    try:
        root, versions = sword.fetch()
    except sword.FetchError as exc:
        pytest.skip(f"no Debian packages: {exc}")
    from attnlab.tasks.translation.data import build_dataset

    m = build_dataset(tmp_path, vocab_size=1000)
    counts = {s: m["splits"][s]["pairs"] for s in ("train", "validation", "test")}
    assert 29000 < sum(counts.values()) < 31102 and counts["test"] > 1000
    assert set(m["splits"]["test"]["books"]) == set(TEST_BOOKS)
    text = (tmp_path / "train.jsonl").read_text()
    assert "<" not in text and "strong:" not in text and "Glossary" not in text
    first = json.loads(text.splitlines()[0])
    assert first["en"] == "In the beginning, God created the heavens and the earth."
    assert first["es"] == "En el principio crió Dios los cielos y la tierra."
