"""`edgewatch.windows`: the agent's tumbling-window summaries over arrays, checked by hand, with its
defined behaviour for empty input, unsorted timestamps, late readings and NaN."""

import subprocess
import sys

import numpy as np
import pytest

import edgewatch

FIELDS = [
    "start_ms", "end_ms", "count", "min", "max", "mean", "std",
    "first_ts_ms", "last_ts_ms", "max_score", "revision",
]


def test_summaries_by_hand():
    ts = np.array([0, 10, 59_999, 60_000, 61_000, 185_000], dtype=np.int64)
    values = np.array([2.0, 4.0, 6.0, 1.0, 3.0, -5.0])
    w = edgewatch.windows(ts, values, 60_000)
    assert list(w) == FIELDS
    assert w["start_ms"].tolist() == [0, 60_000, 180_000]
    assert w["end_ms"].tolist() == [60_000, 120_000, 240_000]
    assert w["count"].tolist() == [3, 2, 1]
    assert w["min"].tolist() == [2.0, 1.0, -5.0]
    assert w["max"].tolist() == [6.0, 3.0, -5.0]
    assert w["mean"].tolist() == [4.0, 2.0, -5.0]
    # Population standard deviation, 0 for a single reading (as the agent's summary).
    np.testing.assert_allclose(w["std"], [np.sqrt(8.0 / 3.0), 1.0, 0.0], rtol=1e-15)
    assert w["first_ts_ms"].tolist() == [0, 60_000, 185_000]
    assert w["last_ts_ms"].tolist() == [59_999, 61_000, 185_000]
    assert w["max_score"].tolist() == [0.0, 0.0, 0.0]
    assert w["revision"].tolist() == [0, 0, 0]
    assert w["start_ms"].dtype == np.int64 and w["mean"].dtype == np.float64


def test_scores_give_max_score_clamped_as_the_agent_does():
    ts = np.arange(6, dtype=np.int64) * 1000
    scores = np.array([0.1, 0.7, 0.2, np.nan, 1.5, -1.0])
    w = edgewatch.windows(ts, np.ones(6), 3000, scores=scores)
    assert w["max_score"].tolist() == [0.7, 1.0]
    with pytest.raises(ValueError, match="differ in length: 6, 6, 5"):
        edgewatch.windows(ts, np.ones(6), 3000, scores=scores[:5])


def test_windows_align_to_the_epoch_including_before_it():
    w = edgewatch.windows(np.array([-1, 0, 1]), np.array([1.0, 2.0, 3.0]), 10)
    assert w["start_ms"].tolist() == [-10, 0] and w["count"].tolist() == [1, 2]


def test_empty_input_gives_empty_arrays():
    w = edgewatch.windows(np.array([], dtype=np.int64), np.array([]), 1000)
    assert list(w) == FIELDS and all(len(a) == 0 for a in w.values())


def test_out_of_order_within_the_open_window_is_fine():
    w = edgewatch.windows(np.array([5, 1, 3]), np.array([5.0, 1.0, 3.0]), 10)
    assert (w["count"].tolist(), w["first_ts_ms"].tolist(), w["last_ts_ms"].tolist()) == (
        [3], [1], [5]
    )


def test_unsorted_timestamps_behind_a_closed_window_raise_or_drop():
    ts = np.array([0, 1000, 2000, 500, 2500])
    values = np.array([1.0, 2.0, 3.0, 100.0, 4.0])
    with pytest.raises(ValueError, match=r"ts_ms\[3\] = 500 is late.*watermark reached 2000.*late=\"drop\""):
        edgewatch.windows(ts, values, 1000)
    w = edgewatch.windows(ts, values, 1000, late="drop")
    assert w["start_ms"].tolist() == [0, 1000, 2000]
    assert w["count"].tolist() == [1, 1, 2]
    assert 100.0 not in w["max"].tolist()
    # What was left out: the number of readings minus the counts.
    assert len(ts) - w["count"].sum() == 1
    with pytest.raises(ValueError, match='late: must be "raise" or "drop", got "keep"'):
        edgewatch.windows(ts, values, 1000, late="keep")


def test_allowed_lateness_merges_late_readings_as_a_corrected_revision():
    ts = np.array([0, 1000, 2000, 500, 2500])
    values = np.array([1.0, 2.0, 3.0, 100.0, 4.0])
    # The window [0, 1000) closed at watermark 1000; with 1 s of lateness it is retained until
    # 2000, so the reading at 500 (watermark 2000) is still late; with 1.5 s it merges.
    with pytest.raises(ValueError, match="allowed_lateness_ms 1000"):
        edgewatch.windows(ts, values, 1000, allowed_lateness_ms=1000)
    w = edgewatch.windows(ts, values, 1000, allowed_lateness_ms=1500)
    assert w["count"].tolist() == [2, 1, 2]
    assert w["max"].tolist() == [100.0, 2.0, 4.0]
    assert w["revision"].tolist() == [1, 0, 0], "the corrected window, as a receiver keeps it"


def test_nan_and_out_of_range_values_are_skipped_like_the_agents_ingest():
    ts = np.array([0, 1, 2, 3, 4, 5000])
    values = np.array([1.0, np.nan, np.inf, 2e100, 3.0, np.nan])
    w = edgewatch.windows(ts, values, 1000)
    # The window of the NaN at 5000 never opens: the agent never saw a reading there.
    assert w["start_ms"].tolist() == [0]
    assert (w["count"].tolist(), w["mean"].tolist(), w["last_ts_ms"].tolist()) == ([2], [2.0], [4])
    # A skipped value does not move the watermark: a reading after it is not late.
    w = edgewatch.windows(np.array([0, 5000, 10]), np.array([1.0, np.nan, 2.0]), 1000)
    assert w["count"].tolist() == [2]


def test_bad_arguments():
    with pytest.raises(ValueError, match="window_ms: window size must be > 0, got 0"):
        edgewatch.windows([0], [1.0], 0)
    with pytest.raises(ValueError, match="allowed_lateness_ms: must be >= 0, got -1"):
        edgewatch.windows([0], [1.0], 10, allowed_lateness_ms=-1)
    with pytest.raises(ValueError, match="differ in length"):
        edgewatch.windows([0, 1], [1.0], 10)
    with pytest.raises(TypeError, match="ts_ms: must be int64-compatible"):
        edgewatch.windows(np.array([0.5]), [1.0], 10)


def test_matches_a_straightforward_reference_on_random_sorted_data():
    rng = np.random.default_rng(7)
    ts = np.sort(rng.integers(0, 10_000_000, 5000))
    values = rng.normal(20.0, 3.0, 5000)
    w = edgewatch.windows(ts, values, 60_000)
    starts = ts - ts % 60_000
    for i, s in enumerate(w["start_ms"]):
        sel = values[starts == s]
        assert w["count"][i] == len(sel)
        assert w["min"][i] == sel.min() and w["max"][i] == sel.max()
        np.testing.assert_allclose(w["mean"][i], sel.mean(), rtol=1e-12)
        np.testing.assert_allclose(w["std"][i], sel.std(), rtol=1e-9, atol=1e-12)
    assert w["count"].sum() == len(ts)


def test_windows_frame_is_a_data_frame_indexed_by_start():
    import pandas as pd

    ts = np.array([0, 10, 60_000])
    f = edgewatch.windows_frame(ts, np.array([1.0, 3.0, 5.0]), 60_000)
    assert isinstance(f, pd.DataFrame) and list(f.columns) == FIELDS
    assert f.index.name == "start" and str(f.index.tz) == "UTC"
    assert f.index[1] == pd.Timestamp("1970-01-01 00:01:00", tz="UTC")
    assert f["mean"].tolist() == [2.0, 5.0]
    with pytest.raises(ValueError, match="late"):
        edgewatch.windows_frame(np.array([60_000, 0]), np.array([1.0, 2.0]), 1000)


def test_windows_frame_without_pandas_says_how_to_get_it():
    code = (
        "import sys; sys.modules['pandas'] = None\n"
        "import edgewatch\n"
        "try:\n"
        "    edgewatch.windows_frame([0], [1.0], 10)\n"
        "except ImportError as e:\n"
        "    print(e)\n"
        "print(edgewatch.windows([0], [1.0], 10)['count'].tolist())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "needs pandas (pip install pandas)" in out.stdout
    assert out.stdout.strip().endswith("[1]")
