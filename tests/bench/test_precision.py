"""The quality side of the fast path: bf16 and int8 weights keep the shipped target's test perplexity."""

from attnlab.bench import precision


def test_int8_and_bf16_perplexity_within_two_percent_of_fp32():
    rows = precision.run("default", seq_len=128, n_windows=8, max_files=300)
    by = {r["precision"]: r for r in rows}
    assert set(by) == {"fp32", "bf16", "int8"} and by["fp32"]["ppl_vs_fp32"] == 0.0
    assert by["int8"]["weight_MB"] < 0.3 * by["fp32"]["weight_MB"]
    for p in ("bf16", "int8"):
        assert abs(by[p]["ppl_vs_fp32"]) < 0.02 and by[p]["argmax_agree"] > 0.95
