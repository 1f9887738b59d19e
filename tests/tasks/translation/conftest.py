"""A tiny made-up parallel "Bible" in the two modules' raw OSIS markup (no apt, no pysword needed)."""

from __future__ import annotations

import pytest

EN = "the light of day and night water over earth man woman king house went came said".split()
ES = "la luz del día y noche agua sobre tierra hombre mujer rey casa fue vino dijo".split()
BOOKS = ("Gen", "Ruth", "Josh", "Matt", "Jas", "Rom")  # train, validation, test, train, validation, test


def make_raw_verses() -> tuple[dict, dict]:
    """(English, Spanish) raw verse dicts keyed (book, chapter, verse), with the markup of the real modules."""
    en, es = {}, {}
    for b, book in enumerate(BOOKS):
        for ch in (1, 2):
            for v in range(1, 9):
                n = 3 + (b * 7 + ch * 3 + v * 5) % 11
                idx = [(b + ch * v + j * j) % len(EN) for j in range(n)]
                en[(book, ch, v)] = " ".join(f'<w lemma="strong:H{i:04d}">{EN[i]}</w>' for i in idx) + ". "
                words = [ES[i] for i in idx]
                if v == 1:  # the Spanish module's drop capital at a chapter opening
                    words[0] = words[0].upper()
                es[(book, ch, v)] = " ".join(f'<w lemma="strong:H{i:04d}">{w}</w>' for i, w in zip(idx, words)) + ". "
    en[("Gen", 1, 2)] = ('<w lemma="strong:H0430">God</w><note placement="foot"><reference type="annotateRef">1:2 '
                         '</reference>The Hebrew word rendered “God” is “אֱלֹהִ֑ים” (Elohim).</note><w lemma="strong:'
                         'H1254">created</w> the light<note type="crossReference"><reference>John 1:1</reference>'
                         '</note>. <div eID="gen25" type="x-p"/>')
    es[("Gen", 1, 2)] = '<w lemma="strong:H0430">Dios</w> <transChange type="added">crió</transChange> la luz. '
    es[("Gen", 1, 5)] = ""  # an empty verse on one side: dropped
    en[("Gen", 2, 9)] = "an English-only verse."  # one-sided: dropped
    en[("Tob", 1, 1)] = "a deuterocanonical verse."  # a book the Spanish module lacks
    return en, es


@pytest.fixture()
def raw_verses() -> tuple[dict, dict]:
    return make_raw_verses()


@pytest.fixture(scope="module")
def translation_data(tmp_path_factory):
    """A data folder as `attnlab data translation` writes it, from the made-up verses (vocab 300)."""
    from attnlab.tasks.translation.data import prepare, write_dataset

    out = tmp_path_factory.mktemp("en-es")
    splits, report = prepare(*make_raw_verses())
    write_dataset(out, splits, report, vocab_size=300, versions={"sword-text-web": "test", "sword-text-sparv": "test"})
    return out
