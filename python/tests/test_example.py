"""python/examples/score_csv.py on a NAB file: scores, windows and alarms printed; the plot written
when matplotlib is installed, and a clean exit with a message when it is not."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np

import edgewatch

SCRIPT = Path(__file__).resolve().parents[2] / "python" / "examples" / "score_csv.py"
NYC = "data/realKnownCause/nyc_taxi.csv"


def run(args, block_matplotlib: bool):
    """Runs the script in a fresh interpreter; `block_matplotlib` makes its import fail, as on a
    machine without it."""
    code = (
        ("import sys; sys.modules['matplotlib'] = None\n" if block_matplotlib else "")
        + "import runpy, sys\n"
        + f"sys.argv = [{str(SCRIPT)!r}] + {list(map(str, args))!r}\n"
        + f"runpy.run_path({str(SCRIPT)!r}, run_name='__main__')\n"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)


def alarms_of(nab_dir):
    """What the script should find, computed here with the package."""
    import csv

    with open(nab_dir / NYC) as f:
        rows = list(csv.reader(f))[1:]
    ts = np.array([r[0] for r in rows], dtype="datetime64[ms]").astype(np.int64)
    values = np.array([float(r[1]) for r in rows])
    det = edgewatch.Detector.preset("ensemble")
    alarms = edgewatch.alarm_scores(det.score(ts, values), det.threshold)
    return len(ts), int(np.count_nonzero(alarms >= det.threshold))


def test_without_matplotlib_it_reports_and_exits_cleanly(nab_dir, tmp_path):
    png = tmp_path / "nyc.png"
    out = run([nab_dir / NYC, "--png", png], block_matplotlib=True)
    assert out.returncode == 0, out.stderr
    n, alarms = alarms_of(nab_dir)
    assert alarms >= 1, "nyc_taxi has an alarm (New Year's night): the count is checked"
    assert f"{n} readings" in out.stdout and f": {alarms} alarms" in out.stdout, out.stdout
    assert "windows of 3600000 ms" in out.stdout
    assert "matplotlib is not installed (pip install matplotlib): no plot written" in out.stdout
    assert not png.exists()


def test_with_matplotlib_if_installed_it_writes_the_png(nab_dir, tmp_path):
    """Runs unblocked: writes the PNG where matplotlib is installed; where it is not (CI does not
    install it), the natural ImportError takes the same clean exit as above."""
    png = tmp_path / "nyc.png"
    out = run([nab_dir / NYC, "--png", png, "--detector", "hst"], block_matplotlib=False)
    assert out.returncode == 0, out.stderr
    if importlib.util.find_spec("matplotlib") is None:
        assert "no plot written" in out.stdout and not png.exists()
    else:
        assert f"plot written to {png}" in out.stdout
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_a_missing_column_is_a_clear_error(nab_dir):
    out = run([nab_dir / NYC, "--value-column", "nope"], block_matplotlib=True)
    assert out.returncode != 0 and "no column 'nope' (columns: timestamp, value)" in out.stderr
