import json

import pytest

from attnlab.cli import main


@pytest.mark.slow
def test_a_short_soak_survives_its_kills_and_ends_equal(tmp_path, isolated_cache):
    assert main(["bench", "faults", "--kills", "2", "--steps", "3", "--out", str(tmp_path / "soak"),
                 "--json", str(tmp_path / "r.json")]) == 0
    summary = json.loads((tmp_path / "r.json").read_text())["summary"]
    assert summary["kills_survived"] == 2 and summary["runs_equal"] == summary["runs"] >= 1
    assert summary["leftovers"] == 0 and summary["problems"] == []
