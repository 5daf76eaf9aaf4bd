"""`edgewatch.nab_score` against `edgewatch eval nab --json` on the same files and scores."""

import json
import shutil
import subprocess

import numpy as np
import pytest

import edgewatch
from test_detector import NAB_FILES, read_nab

PROFILES = ("standard", "reward_low_FP_rate", "reward_low_FN_rate")


@pytest.mark.parametrize("preset", ["ensemble", "ewma", "null"])
def test_nab_score_equals_eval_nab(nab_dir, edgewatch_bin, tmp_path, preset):
    (tmp_path / "labels").mkdir()
    labels = nab_dir / "labels" / "combined_windows.json"
    shutil.copy(labels, tmp_path / "labels")
    files = {}
    for name in NAB_FILES:
        (tmp_path / "data" / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(nab_dir / "data" / name, tmp_path / "data" / name)
        ts, values = read_nab(nab_dir / "data" / name)
        if preset == "null":
            scores = np.zeros(len(ts))
        else:
            det = edgewatch.Detector.preset(preset)
            scores = edgewatch.alarm_scores(det.score(ts, values), det.threshold)
        files[name] = (ts, scores)
    out = subprocess.run(
        [str(edgewatch_bin), "eval", "nab", "--data", str(tmp_path), "--detector", preset, "--json"],
        check=True, capture_output=True, text=True,
    )
    rust = json.loads(out.stdout)
    # Labels as a path, as JSON text and as a dict give the same report.
    reports = [
        edgewatch.nab_score(files, labels),
        edgewatch.nab_score(files, str(labels)),
        edgewatch.nab_score(files, labels.read_text()),
        edgewatch.nab_score(files, json.loads(labels.read_text())),
    ]
    for report in reports:
        assert report == reports[0]
    py = reports[0]
    assert py["files"] == sorted(NAB_FILES)
    for profile in PROFILES:
        r, p = rust["profiles"][profile], py[profile]
        for key in ("threshold", "raw", "null", "perfect", "normalized", "windows", "detected", "false_positives"):
            assert p[key] == r[key], f"{preset} {profile} {key}: {p[key]} vs {r[key]}"
    if preset == "null":
        assert all(py[p]["normalized"] == 0 for p in PROFILES)


def test_nab_score_errors(nab_dir):
    labels = nab_dir / "labels" / "combined_windows.json"
    ts = np.arange(10, dtype=np.int64)
    with pytest.raises(ValueError, match="not in the labels"):
        edgewatch.nab_score({"nope/x.csv": (ts, np.zeros(10))}, labels)
    with pytest.raises(ValueError, match="files: no file to score"):
        edgewatch.nab_score({}, labels)
    with pytest.raises(ValueError, match="labels: "):
        edgewatch.nab_score({}, "{not json")
    with pytest.raises(ValueError, match="expected a \\(timestamps, scores\\) pair"):
        edgewatch.nab_score({NAB_FILES[0]: ts}, labels)
    name = NAB_FILES[0]
    with pytest.raises(ValueError):
        edgewatch.nab_score({name: (ts, np.zeros(9))}, labels)
