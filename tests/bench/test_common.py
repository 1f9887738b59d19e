"""The benchmarks' one clock (``clock.Stopwatch``) and one markdown table writer."""

from attnlab.bench import clock as common_clock
from attnlab.bench import common


def test_stopwatch_times_blocks_and_calls_on_the_perf_counter(monkeypatch):
    ticks = iter([0.0, 1.0, 4.0, 9.0, 10.0, 13.0, 20.0, 26.5])
    monkeypatch.setattr(common_clock.time, "perf_counter", lambda: next(ticks))
    with common_clock.Stopwatch() as clock:  # made at 0, restarted on entry at 1, stopped at 4
        pass
    assert clock.seconds == 3.0 and clock.seconds == 3.0  # frozen once the block ends
    assert common_clock.Stopwatch.call(lambda: "result") == (3.0, "result")  # made 9, entered 10, stopped 13
    live = common_clock.Stopwatch()  # started at 20, read at 26.5 while still running
    assert live.seconds == 6.5


def test_markdown_table_columns_in_order_blanks_and_number_format():
    rows = [{"name": "a", "x": 0.123456, "n": 12345.6}, {"name": "b", "x": 2}]
    assert common.markdown_table(rows, ["name", "x", "n"]) == (
        "| name | x | n |\n|---|---|---|\n| a | 0.123 | 12,346 |\n| b | 2 |  |")


def test_benchmarks_and_tour_time_through_the_one_clock():
    """No benchmark or tour section reads ``time.perf_counter`` by hand: every timing goes through
    ``bench/clock.py``, so a change of clock (or of how a block is timed) is made once."""
    import pathlib

    import attnlab

    root = pathlib.Path(attnlab.__file__).parent
    by_hand = [str(f.relative_to(root)) for room in ("bench", "tour") for f in sorted((root / room).glob("*.py"))
               if f.name != "clock.py" and "perf_counter" in f.read_text()]
    assert by_hand == []
