"""The multivariate device model from Python: fit (the aggregator's own fit, compared bit for bit
with a model a live `edgewatch aggregator` trained and serves on `/api/models/{device}`), scoring,
the JSON artifact, DataFrames, and refusals."""

import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

import edgewatch
from conftest import GIL_SHARE_MIN

FEATURES = ["current", "flow", "temp"]


def correlated(n: int, seed: int = 0) -> np.ndarray:
    """n rows of three correlated features with a little noise."""
    i = np.arange(n, dtype=np.float64)
    x = np.sin(i / 9.0)
    w = 0.03 * np.sin(i * 1.618 + seed)
    return np.column_stack([2.0 * x + w, x - w, 40.0 + 0.5 * x + w * w])


def broken(rows: np.ndarray) -> np.ndarray:
    """The same rows with the third feature's correlation inverted."""
    out = rows.copy()
    out[:, 2] = 40.0 - 0.5 * (out[:, 1] + out[:, 0]) / 3.0 * 2.0
    return out


def nearest_rank(values: np.ndarray, q: float) -> float:
    """The models crate's `quantile`: the element at round((n-1)·q), rounding half away from 0."""
    i = int(math.floor((len(values) - 1) * q + 0.5))
    return float(np.sort(values, kind="stable")[i])


@pytest.fixture(scope="module")
def model() -> edgewatch.PcaModel:
    return edgewatch.PcaModel.fit(
        correlated(400), FEATURES, key="pump-7", from_ms=1000, to_ms=401_000, version=3
    )


def test_fit_gives_the_attributes_of_the_artifact(model):
    assert model.kind == "pca"
    assert (model.key, model.version, model.features) == ("pump-7", 3, FEATURES)
    assert (model.samples, model.trained_from_ms, model.trained_to_ms) == (400, 1000, 401_000)
    assert model.means.shape == (3,) and model.scales.shape == (3,)
    k = len(model.eigenvalues)
    assert 1 <= k <= 2 and model.components.shape == (k, 3)
    # Orthonormal axes, as validate() requires.
    np.testing.assert_allclose(model.components @ model.components.T, np.eye(k), atol=1e-9)
    q = model.quality
    assert q["skipped_rows"] == 0 and q["constant_features"] == []
    assert 0.9 <= q["explained_variance_ratio"] <= 1.0
    assert isinstance(q["solver"], str) and model.linfa_version
    assert "pump-7" in repr(model)


def test_scores_of_the_training_rows_give_the_quality_the_rust_fit_computed(model):
    """fit() scores its training rows in Rust (median, p99, alarm rate); score() must give the
    very same numbers, so both paths agree to the bit."""
    rows = correlated(400)
    scores, top = model.score(rows)
    assert scores.dtype == np.float64 and top.dtype == np.int64 and scores.shape == (400,)
    q = model.quality
    assert nearest_rank(scores, 0.5) == q["median_score"]
    assert nearest_rank(scores, 0.99) == q["p99_score"]
    assert np.count_nonzero(scores >= 0.5) / len(scores) == q["alarm_rate"]


def test_a_correlation_break_scores_high_and_names_the_feature(model):
    normal, _ = model.score(correlated(300, seed=5)[100:])
    assert np.all(normal < 0.5), normal.max()
    bad, top = model.score(broken(correlated(300, seed=5))[100:])
    assert np.mean(bad >= 0.5) > 0.9
    assert np.bincount(top[bad >= 0.5]).argmax() == 2


def test_missing_values_are_imputed_when_scoring_as_the_agent_does(model):
    rows = correlated(10)
    rows[3, 1] = np.nan
    scores, top = model.score(rows)
    assert np.all(np.isfinite(scores))
    assert top[3] != 1, "a missing feature is never the top one"


def test_json_round_trips_exactly(model):
    text = model.to_json()
    doc = json.loads(text)
    assert doc["key"] == "pump-7" and doc["version"] == 3 and doc["kind"] == "pca"
    back = edgewatch.PcaModel.from_json(text)
    assert back == model and back.to_json() == text
    rows = broken(correlated(50))
    np.testing.assert_array_equal(back.score(rows)[0], model.score(rows)[0])
    assert back != edgewatch.PcaModel.fit(correlated(400), FEATURES, key="pump-8")
    assert model != "not a model"


def test_bad_artifacts_raise_value_error_with_the_rust_message(model):
    doc = json.loads(model.to_json())
    doc["eigenvalues"][0] = -1.0
    with pytest.raises(ValueError, match=r'model "pump-7" v3: .*eigenvalues.*eigenvalue 0 must be finite and > 0, got -1'):
        edgewatch.PcaModel.from_json(json.dumps(doc))
    doc = json.loads(model.to_json())
    doc["components"][0][0] += 0.5
    with pytest.raises(ValueError, match="components.*dot product"):
        edgewatch.PcaModel.from_json(json.dumps(doc))
    doc = json.loads(model.to_json())
    doc["means"] = doc["means"][:2]
    with pytest.raises(ValueError, match="means"):
        edgewatch.PcaModel.from_json(json.dumps(doc))
    doc = json.loads(model.to_json())
    del doc["t2"]
    with pytest.raises(ValueError, match="not a model artifact: missing field `t2`"):
        edgewatch.PcaModel.from_json(json.dumps(doc))
    with pytest.raises(ValueError, match="not a model artifact"):
        edgewatch.PcaModel.from_json("[1, 2")


def test_nan_and_huge_training_values_are_refused_naming_the_cell():
    rows = correlated(100)
    rows[7, 2] = np.nan
    with pytest.raises(ValueError, match=r'data\[7\]\[2\] \("temp"\): must be finite.*got NaN'):
        edgewatch.PcaModel.fit(rows, FEATURES)
    rows = correlated(100)
    rows[0, 0] = 1e200
    with pytest.raises(ValueError, match=r"data\[0\]\[0\]"):
        edgewatch.PcaModel.fit(rows, FEATURES)
    rows[0, 0] = -np.inf
    with pytest.raises(ValueError, match=r"data\[0\]\[0\]"):
        edgewatch.PcaModel.fit(rows, FEATURES)


def test_wrong_features_are_refused():
    rows = correlated(100)
    with pytest.raises(ValueError, match="features: name every column"):
        edgewatch.PcaModel.fit(rows)
    with pytest.raises(ValueError, match=r"features: 2 names for 3 columns"):
        edgewatch.PcaModel.fit(rows, ["a", "b"])
    with pytest.raises(ValueError, match='training data: feature "a" appears twice'):
        edgewatch.PcaModel.fit(rows, ["a", "a", "b"])
    with pytest.raises(ValueError, match="must be two-dimensional"):
        edgewatch.PcaModel.fit(rows[:, 0], ["a"])
    with pytest.raises(ValueError, match="at least 2 rows"):
        edgewatch.PcaModel.fit(rows[:1], FEATURES)
    with pytest.raises(ValueError, match="variance"):
        edgewatch.PcaModel.fit(rows, FEATURES, variance=1.5)
    m = edgewatch.PcaModel.fit(rows, FEATURES)
    with pytest.raises(ValueError, match=r"expects 3 columns .* the matrix has 2"):
        m.score(rows[:, :2])
    with pytest.raises(ValueError, match=r"x\[None, :\]"):
        m.score(rows[0])
    with pytest.raises(TypeError):
        m.score(np.array([["a", "b", "c"]]))


def test_fit_options_other_than_the_defaults():
    rows = correlated(300)
    one = edgewatch.PcaModel.fit(rows, FEATURES, max_components=1)
    assert one.components.shape == (1, 3)
    default = edgewatch.PcaModel.fit(rows, FEATURES)
    explicit = edgewatch.PcaModel.fit(rows, FEATURES, variance=0.9, max_components=8)
    assert default == explicit


def test_data_frames_use_their_numeric_columns_and_are_scored_by_name():
    import pandas as pd

    rows = correlated(300)
    frame = pd.DataFrame(rows, columns=FEATURES)
    frame["site"] = "north"  # not numeric: left out
    from_frame = edgewatch.PcaModel.fit(frame, key="k")
    assert from_frame.features == FEATURES
    assert from_frame == edgewatch.PcaModel.fit(rows, FEATURES, key="k")
    # Columns are picked by name, in the model's order, whatever the frame's order.
    shuffled = frame[["temp", "site", "current", "flow"]]
    np.testing.assert_array_equal(from_frame.score(shuffled)[0], from_frame.score(rows)[0])
    two = edgewatch.PcaModel.fit(frame, ["flow", "current"], key="k")
    assert two.features == ["flow", "current"]
    with pytest.raises(ValueError, match=r"no column \['temp'\]|no column \[\"temp\"\]"):
        from_frame.score(frame[["current", "flow"]])
    # Nullable columns: a missing value is NaN, refused for training like any NaN.
    nullable = frame[FEATURES].astype("Float64")
    nullable.iloc[4, 1] = pd.NA
    with pytest.raises(ValueError, match=r"data\[4\]\[1\]"):
        edgewatch.PcaModel.fit(nullable)


def test_pandas_is_not_imported_by_the_package():
    code = "import sys, edgewatch; print('pandas' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_edgewatch_models_show_validates_the_python_artifact(model, edgewatch_bin, tmp_path):
    path = tmp_path / "model.json"
    path.write_text(model.to_json())
    out = subprocess.run(
        [str(edgewatch_bin), "models", "show", str(path)], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert "device          pump-7" in out.stdout and "valid           yes" in out.stdout
    assert "current, flow, temp" in out.stdout and "400 vectors" in out.stdout


# --- against a live aggregator -------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def program(name: str) -> str:
    """A program scripts/test installs (tests never skip: a missing one fails, saying so)."""
    for d in os.environ.get("PATH", "").split(":") + ["/usr/sbin", "/sbin"]:
        p = Path(d) / name
        if p.is_file():
            return str(p)
    pytest.fail(f"{name} is not installed: run scripts/test (it apt-installs mosquitto)")


def wait_port(port: int, proc: subprocess.Popen, what: str, log: Path = None) -> None:
    deadline = time.monotonic() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            output = log.read_text() if log else ""
            assert proc.poll() is None, f"{what} exited: {proc.returncode}: {output}"
            assert time.monotonic() < deadline, f"{what} never listened on {port}"
            time.sleep(0.05)


@pytest.fixture()
def aggregator(edgewatch_bin, tmp_path):
    """mosquitto and an `edgewatch aggregator` with training on and a bearer token:
    yields (mqtt port, http url, token)."""
    mqtt, http = free_port(), free_port()
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(f"listener {mqtt} 127.0.0.1\nallow_anonymous true\npersistence false\n")
    procs = [subprocess.Popen([program("mosquitto"), "-c", str(conf)], stderr=subprocess.DEVNULL)]
    try:
        wait_port(mqtt, procs[0], "mosquitto")
        cfg = tmp_path / "aggregator.yaml"
        cfg.write_text(
            "id: agg-py\n"
            f"mqtt: {{ host: 127.0.0.1, port: {mqtt} }}\n"
            "partitions: 1\nowned: [0]\n"
            f"http: {{ listen: 127.0.0.1:{http}, auth_token_env: EDGEWATCH_PY_TOKEN }}\n"
            f"state: {{ dir: {json.dumps(str(tmp_path / 'state'))} }}\n"
            "training: { enabled: true, check_interval_ms: 200, min_rows: 100, min_samples: 1 }\n"
        )
        env = dict(os.environ, EDGEWATCH_PY_TOKEN="py-t0ken", RUST_LOG="warn")
        log = open(tmp_path / "aggregator.log", "wb")
        procs.append(
            subprocess.Popen(
                [str(edgewatch_bin), "aggregator", "--config", str(cfg)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        )
        wait_port(http, procs[1], "the aggregator", tmp_path / "aggregator.log")
        yield mqtt, f"http://127.0.0.1:{http}", "py-t0ken"
    finally:
        for p in reversed(procs):
            p.terminate()
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()


def test_the_aggregators_fit_equals_the_python_fit_bit_for_bit(aggregator):
    """A training sample sent on a lane as an agent sends it; the model the aggregator fits, read
    back with fetch_model, is the model PcaModel.fit makes of the same rows (same JSON bytes once
    the version, which the aggregator sets from its clock, is the same)."""
    mqtt, url, token = aggregator
    device = "pump py/1"
    rows = correlated(240, seed=3)
    sample = {
        "device": device,
        "features": FEATURES,
        "from_ms": 1_700_000_000_000,
        "to_ms": 1_700_000_060_000,
        "seen": 240,
        "anomalies": 0,
        "rows": rows.tolist(),
    }
    batch = {"agent": "gw-py", "partition": 0, "records": [dict(seq=1, **sample)], "epoch": 1}
    with pytest.raises(LookupError, match='no model of device "pump py/1"'):
        edgewatch.fetch_model(url, device, token=token)
    # The subscription of the aggregator may lag its HTTP port: resend until a model shows
    # (a resend of seq 1 is a duplicate the lane ignores).
    deadline = time.monotonic() + 30
    served = None
    while served is None:
        subprocess.run(
            [program("mosquitto_pub"), "-p", str(mqtt), "-q", "1", "-t", "edgewatch/v1/samples/0/gw-py",
             "-m", json.dumps(batch)],
            check=True,
        )
        t_end = time.monotonic() + 2
        while served is None and time.monotonic() < t_end:
            try:
                served = edgewatch.fetch_model(url, device, token=token)
            except LookupError:
                time.sleep(0.1)
        assert time.monotonic() < deadline, "the aggregator never served a model"
    mine = edgewatch.PcaModel.fit(
        rows, FEATURES, key=device, from_ms=sample["from_ms"], to_ms=sample["to_ms"],
        version=served.version,
    )
    assert mine.to_json() == served.to_json()
    assert mine == served
    probe = broken(correlated(60, seed=9))
    np.testing.assert_array_equal(mine.score(probe)[0], served.score(probe)[0])
    # The route serves exactly the artifact's bytes.
    req = urllib.request.Request(
        url + "/api/models/pump%20py%2F1", headers={"Authorization": f"Bearer {token}"}
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.read().decode() == served.to_json()
    with pytest.raises(PermissionError, match="wrong bearer token"):
        edgewatch.fetch_model(url, device, token="nope")
    with pytest.raises(PermissionError, match="bearer token is required"):
        edgewatch.fetch_model(url, device)
    with pytest.raises(ValueError, match="http://"):
        edgewatch.fetch_model("ws://x", device)
    with pytest.raises(OSError):
        edgewatch.fetch_model(f"http://127.0.0.1:{free_port()}", device, timeout=2)


def test_score_and_windows_release_the_gil(gil_share):
    """While one thread scores a big matrix (or summarises a long series), another keeps running
    Python code (see the `gil_share` fixture)."""
    rows = correlated(2_000_000)
    model = edgewatch.PcaModel.fit(rows[:1000], FEATURES)
    ts = np.arange(10_000_000, dtype=np.int64)
    values = np.sin(ts / 100.0)
    for what, call in (
        ("PcaModel.score", lambda: model.score(rows)),
        ("windows", lambda: edgewatch.windows(ts, values, 1000)),
    ):
        share, detail = gil_share(call)
        assert share > GIL_SHARE_MIN, f"{what} holds the GIL: {detail}"
