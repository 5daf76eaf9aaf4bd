"""The Python face of edgewatch's detectors: the same scores as the Rust binary, bit for bit; state
round trips; configuration errors; every preset."""

import csv
import json
import math
import shutil
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest
import yaml

import edgewatch
from conftest import GIL_SHARE_MIN

# Two categories, integer and fractional values; machine_temperature steps back in time once.
NAB_FILES = [
    "realKnownCause/nyc_taxi.csv",
    "realAdExchange/exchange-3_cpc_results.csv",
    "realKnownCause/machine_temperature_system_failure.csv",
]


def read_nab(path: Path):
    """A NAB data file read the plain Python way: UTC timestamps to int64 ms, values to float64."""
    ts, values = [], []
    with open(path, newline="") as f:
        rows = csv.reader(f)
        assert [h.strip() for h in next(rows)] == ["timestamp", "value"]
        for row in rows:
            if not row:
                continue
            t = datetime.strptime(row[0].strip(), "%Y-%m-%d %H:%M:%S").replace(tzinfo=timezone.utc)
            ts.append(int(t.timestamp()) * 1000)
            values.append(float(row[1]))
    return np.array(ts, dtype=np.int64), np.array(values, dtype=np.float64)


@pytest.fixture(scope="module")
def rust_scores(nab_dir, edgewatch_bin, tmp_path_factory):
    """Rust's per-row scores for every preset on NAB_FILES: `edgewatch eval nab --results` on a NAB
    folder holding just those files (and the corpus's labels)."""
    root = tmp_path_factory.mktemp("nab")
    (root / "labels").mkdir()
    shutil.copy(nab_dir / "labels" / "combined_windows.json", root / "labels")
    for name in NAB_FILES:
        (root / "data" / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(nab_dir / "data" / name, root / "data" / name)
    out = root / "results"
    scores = {}
    for preset in edgewatch.PRESETS:
        subprocess.run(
            [str(edgewatch_bin), "eval", "nab", "--data", str(root), "--detector", preset,
             "--results", str(out), "--json"],
            check=True, stdout=subprocess.DEVNULL,
        )
        for name in NAB_FILES:
            category, file = name.split("/")
            with open(out / preset / category / f"{preset}_{file}", newline="") as f:
                rows = list(csv.DictReader(f))
            scores[preset, name] = rows
    return scores


@pytest.mark.parametrize("preset", edgewatch.PRESETS)
@pytest.mark.parametrize("name", NAB_FILES)
def test_scores_equal_rust_bit_for_bit_on_nab(nab_dir, rust_scores, preset, name):
    ts, values = read_nab(nab_dir / "data" / name)
    rows = rust_scores[preset, name]
    assert len(rows) == len(ts)
    # The inputs Rust read are the ones Python read.
    assert [float(r["value"]) for r in rows] == values.tolist()
    det = edgewatch.Detector.preset(preset)
    raw = det.score(ts, values)
    assert raw.dtype == np.float64 and raw.shape == ts.shape
    # `eval nab` writes the alarm view (the event gate at the recommended threshold), shortest
    # round-trip decimal: parse and compare the bits.
    alarm = edgewatch.alarm_scores(raw, det.threshold)
    expected = np.array([float(r["anomaly_score"]) for r in rows], dtype=np.float64)
    mismatch = np.flatnonzero(alarm.view(np.int64) != expected.view(np.int64))
    assert mismatch.size == 0, f"{preset} {name}: first mismatch at row {mismatch[0]}"
    # Armed rows carry the raw score itself, so most rows check the raw scores bit for bit too.
    armed = expected != 0
    assert np.array_equal(raw[armed].view(np.int64), expected[armed].view(np.int64))


@pytest.mark.parametrize("preset", edgewatch.PRESETS)
def test_update_matches_score_and_state_round_trip_mid_stream_is_bit_identical(nab_dir, preset):
    ts, values = read_nab(nab_dir / "data" / NAB_FILES[0])
    whole = edgewatch.Detector.preset(preset).score(ts, values)
    det = edgewatch.Detector.preset(preset)
    half = len(ts) // 2
    first = np.array([det.update(int(t), float(v)) for t, v in zip(ts[:half], values[:half])])
    assert np.array_equal(first.view(np.int64), whole[:half].view(np.int64))
    state = det.state()
    assert isinstance(state, bytes) and len(state) > 0
    # The binary form starts with the detector's registry index (as in agent checkpoints).
    assert state[0] == edgewatch.PRESETS.index(preset)
    resumed = edgewatch.Detector.from_state(state)
    assert resumed.name == det.name == preset
    assert resumed.state() == state
    rest = resumed.score(ts[half:], values[half:])
    assert np.array_equal(rest.view(np.int64), whole[half:].view(np.int64))
    # The original goes on identically too.
    assert np.array_equal(det.score(ts[half:], values[half:]).view(np.int64), rest.view(np.int64))


def test_config_from_dict_and_yaml_agree_and_defaults_are_the_ensemble(nab_dir):
    ts, values = read_nab(nab_dir / "data" / NAB_FILES[1])
    cfg = {"type": "likelihood", "inner": {"type": "ewma", "alpha": 0.05}}
    a = edgewatch.Detector(cfg).score(ts, values)
    b = edgewatch.Detector(yaml.safe_dump(cfg)).score(ts, values)
    c = edgewatch.Detector("type: likelihood\ninner:\n  type: ewma\n  alpha: 0.05\n").score(ts, values)
    assert np.array_equal(a, b) and np.array_equal(a, c)
    assert not np.array_equal(a, edgewatch.Detector.preset("likelihood").score(ts, values))
    d = edgewatch.Detector()
    assert d.name == "ensemble"
    assert np.array_equal(d.score(ts, values), edgewatch.Detector.preset("ensemble").score(ts, values))
    # Consecutive score() calls continue one stream; int32 timestamps and lists are accepted.
    e = edgewatch.Detector()
    parts = np.concatenate([e.score(ts[:100].tolist(), values[:100].tolist()), e.score(ts[100:], values[100:])])
    assert np.array_equal(parts, edgewatch.Detector().score(ts, values))


@pytest.mark.parametrize(
    "config, message",
    [
        ({"type": "ewma", "alpha": 2}, "detector.alpha: must be in (0, 1], got 2"),
        ({"type": "ewma", "alpah": 0.1}, "detector.alpah: unknown field `alpah`, expected one of `alpha`"),
        ({"type": "ewma", "alpha": "x"}, "detector.alpha: invalid type: string \"x\", expected f64"),
        ({"type": "nope"}, "detector.type: unknown variant `nope`, expected one of `zscore`"),
        ({"alpha": 0.1}, "detector: missing field `type`"),
        ({"type": "ensemble", "threshold": 1.5}, "detector.threshold: "),
        ({"type": "hst", "trees": -1}, "detector.trees: invalid value: integer `-1`"),
        ({"type": "likelihood", "inner": {"type": "ewma", "alpha": 0}}, "detector.alpha: must be in (0, 1]"),
        ("type: ewma\nalpha: 2\n", "detector.alpha (line 2, col 1): must be in (0, 1], got 2"),
        ("type: ewma\nalpha: [1]\n", "detector.alpha (line 2, col 1): invalid type: sequence, expected f64"),
        ("type: ewma\nalpah: 0.1\n", "detector.alpah (line 2, col 1): unknown field `alpah`"),
        ("type: ensemble\n\nthreshold: 0\n", "detector.threshold (line 3, col 1): must be in"),
        ("type: [unclosed\n", "detector (line 2, col 1): "),
        ("- a\n- b\n", "detector[0]: unknown variant `a`"),
    ],
)
def test_bad_config_raises_value_error_naming_the_key(config, message):
    with pytest.raises(ValueError) as e:
        edgewatch.Detector(config)
    assert str(e.value).startswith(message), str(e.value)


def test_bad_calls_raise():
    with pytest.raises(ValueError, match=r"^detector.type: unknown preset \"nope\"; valid: zscore"):
        edgewatch.Detector.preset("nope")
    with pytest.raises(TypeError):
        edgewatch.Detector(42)
    with pytest.raises(ValueError, match="state: "):
        edgewatch.Detector.from_state(b"\xff\xff\xff")
    with pytest.raises(ValueError, match="trailing bytes"):
        edgewatch.Detector.from_state(edgewatch.Detector.preset("ewma").state() + b"\0")
    d = edgewatch.Detector.preset("ewma")
    with pytest.raises(ValueError, match="differ in length"):
        d.score(np.arange(3), np.zeros(2))
    with pytest.raises(TypeError, match="ts: must be int64"):
        d.score(np.arange(3, dtype=np.float64), np.zeros(3))
    with pytest.raises(ValueError, match="one-dimensional"):
        d.score(np.zeros((2, 2), dtype=np.int64), np.zeros((2, 2)))
    with pytest.raises(ValueError, match="anomaly.threshold"):
        edgewatch.alarm_scores(np.zeros(3), 0.0)


@pytest.mark.parametrize("preset", edgewatch.PRESETS)
def test_every_preset_constructs_and_scores(preset):
    assert preset in edgewatch.Detector.presets()
    for det in (edgewatch.Detector.preset(preset), edgewatch.Detector({"type": preset}),
                edgewatch.Detector(f"type: {preset}\n")):
        assert det.name == preset
        assert 0 < det.threshold <= 1
        n = 2000
        ts = np.arange(n, dtype=np.int64) * 60_000
        values = np.sin(np.arange(n) / 50.0) + (np.arange(n) == 1500) * 25.0
        s = det.score(ts, values)
        assert s.shape == (n,) and np.all((s >= 0) & (s <= 1))
        assert math.isfinite(det.update(int(ts[-1]) + 60_000, float("nan")))
        assert det.state_bytes > 0
    assert len(edgewatch.PRESETS) == 9


def test_score_releases_the_gil(gil_share):
    """While one thread is inside score(), another keeps running Python code."""
    n = 2_000_000
    ts = np.arange(n, dtype=np.int64) * 1000
    values = np.sin(np.arange(n) / 100.0)
    det = edgewatch.Detector.preset("ensemble")
    share, detail = gil_share(lambda: det.score(ts, values))
    assert share > GIL_SHARE_MIN, f"score() holds the GIL: {detail}"


def test_the_gil_check_tells_a_call_that_holds_the_gil():
    """The control for the GIL checks: `sorted` on a big list runs in C holding the GIL, so the
    spinner beside it gets almost no CPU."""
    import random

    from conftest import _runs_beside

    data = [random.random() for _ in range(3_000_000)]
    main_cpu, worker_cpu, _ = _runs_beside(lambda: sorted(data))
    assert worker_cpu > 0.05
    assert main_cpu < GIL_SHARE_MIN / 2 * worker_cpu, f"spinner {main_cpu:.3f} s, sort {worker_cpu:.3f} s"
