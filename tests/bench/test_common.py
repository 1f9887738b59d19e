"""The benchmarks' one wall clock (``Stopwatch``) and one markdown table writer."""

from attnlab.bench import common


def test_stopwatch_times_blocks_and_calls_on_the_perf_counter(monkeypatch):
    ticks = iter([0.0, 1.0, 4.0, 9.0, 10.0, 13.0, 20.0, 26.5])
    monkeypatch.setattr(common.time, "perf_counter", lambda: next(ticks))
    with common.Stopwatch() as clock:  # made at 0, restarted on entry at 1, stopped at 4
        pass
    assert clock.seconds == 3.0 and clock.seconds == 3.0  # frozen once the block ends
    assert common.Stopwatch.call(lambda: "result") == (3.0, "result")  # made 9, entered 10, stopped 13
    live = common.Stopwatch()  # started at 20, read at 26.5 while still running
    assert live.seconds == 6.5


def test_markdown_table_columns_in_order_blanks_and_number_format():
    rows = [{"name": "a", "x": 0.123456, "n": 12345.6}, {"name": "b", "x": 2}]
    assert common.markdown_table(rows, ["name", "x", "n"]) == (
        "| name | x | n |\n|---|---|---|\n| a | 0.123 | 12,346 |\n| b | 2 |  |")
