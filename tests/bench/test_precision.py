"""The quality side of the fast path: every precision of prepare_for_decode keeps the shipped target's test
perplexity (8-bit and bf16 within 2% of fp32, the 4-bit block formats within +5%)."""

from attnlab.bench import precision
from attnlab.inference.fast import PRECISIONS


def test_every_precision_keeps_the_perplexity_of_fp32():
    rows = precision.run("default", seq_len=128, n_windows=8, max_files=300)
    by = {r["precision"]: r for r in rows}
    assert set(by) == set(PRECISIONS) and by["fp32"]["ppl_vs_fp32"] == 0.0
    assert by["int8"]["weight_MB"] < 0.3 * by["fp32"]["weight_MB"]
    for p in ("bf16", "int8", "q8_0"):
        assert abs(by[p]["ppl_vs_fp32"]) < 0.02 and by[p]["argmax_agree"] > 0.95, (p, by[p])
    for p in ("q4_0", "q4_1", "q4_k"):
        assert by[p]["ppl_vs_fp32"] < 0.05 and by[p]["argmax_agree"] > 0.85, (p, by[p])
        assert by[p]["weight_MB"] < 0.2 * by["fp32"]["weight_MB"]
