"""The tour's one verdict rule (tour/verdict.py): each outcome is reachable, and the spread decides."""

import math

import pytest

from attnlab.tour.verdict import check, combine, compare, exact, spread


def test_compare_less_confirms_refutes_or_is_inconclusive_by_the_spread():
    lower, higher = [1.0, 1.1, 1.05], [2.0, 2.1, 2.05]
    assert compare(lower, higher, claim="less").verdict == "confirmed"
    assert compare(higher, lower, claim="less").verdict == "refuted"
    # a difference of 0.02 inside a seed-to-seed spread of 0.5 proves nothing either way
    assert compare([1.0, 1.5], [1.02, 1.52], claim="less").verdict == "inconclusive"
    # the same difference with a tight spread counts
    assert compare([1.0, 1.001], [1.02, 1.021], claim="less").verdict == "confirmed"
    # ... unless the stated threshold asks for more
    assert compare([1.0, 1.001], [1.02, 1.021], claim="less", threshold=0.05).verdict == "inconclusive"


def test_compare_greater_mirrors_less():
    assert compare([3.0, 3.1], [1.0, 1.1], claim="greater").verdict == "confirmed"
    assert compare([1.0, 1.1], [3.0, 3.1], claim="greater").verdict == "refuted"


def test_compare_within_is_a_non_inferiority_test():
    mha = [5.00, 5.01, 5.02]
    assert compare([5.01, 5.02, 5.03], mha, claim="within", threshold=0.05).verdict == "confirmed"
    assert compare([5.30, 5.31, 5.32], mha, claim="within", threshold=0.05).verdict == "refuted"
    assert compare([5.04, 5.06, 5.08], mha, claim="within", threshold=0.05).verdict == "inconclusive"
    # better than the reference is fine
    assert compare([4.5, 4.51], mha, claim="within", threshold=0.05).verdict == "confirmed"


def test_one_sample_each_is_guarded_by_the_threshold_alone_and_says_so():
    v = compare([1.0], [1.04], claim="less", threshold=0.05)
    assert v.verdict == "inconclusive" and "no spread is measured" in v.rule
    assert compare([1.0], [1.1], claim="less", threshold=0.05).verdict == "confirmed"
    v = compare([1.0, 1.2, 1.1], [2.0, 2.1, 2.05], claim="less")
    assert "over 3/3 seeds" in v.rule and "spread 0.2" in v.detail


def test_a_diverged_run_moves_the_mean_not_the_spread():
    assert spread([1.0, math.inf, 1.2]) == pytest.approx(0.2)
    assert compare([1.0, 1.1], [1.0, math.inf], claim="less").verdict == "confirmed"


def test_check_exact_and_combine():
    assert check(0.3, below=0.5, refuted_at=1.0, what="ratio").verdict == "confirmed"
    assert check(0.7, below=0.5, refuted_at=1.0, what="ratio").verdict == "inconclusive"
    assert check(1.0, below=0.5, refuted_at=1.0, what="ratio").verdict == "refuted"
    assert check(math.nan, below=0.5, refuted_at=1.0, what="ratio").verdict == "inconclusive"
    yes, no = exact(True, what="identity"), exact(False, what="identity")
    maybe = check(0.7, below=0.5, refuted_at=1.0, what="ratio")
    assert (yes.verdict, no.verdict) == ("confirmed", "refuted")
    assert combine(yes, yes).verdict == "confirmed"
    assert combine(yes, maybe).verdict == "inconclusive"
    assert combine(yes, maybe, no).verdict == "refuted"
    assert "(2) ratio < 0.5 confirms" in combine(yes, maybe).rule


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="claim"):
        compare([1.0], [2.0], claim="bigger")
    with pytest.raises(ValueError, match="at least one sample"):
        compare([], [2.0], claim="less")
    with pytest.raises(ValueError, match="below <= refuted_at"):
        check(1.0, below=2.0, refuted_at=1.0, what="x")
