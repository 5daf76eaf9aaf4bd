"""Score a CSV history with the detector an edgewatch agent runs, and plot it.

    python python/examples/score_csv.py data.csv [--detector ensemble] [--png scores.png]

The CSV has a timestamp column (ISO 8601 like NAB's ``2014-07-01 00:00:00``, or epoch
milliseconds) and a value column: by default the first two, as in NAB's files. The script prints
the readings, the hourly windows the agent would send, and the alarms the agent's event gate would
raise; with matplotlib installed it saves the values, scores and alarms as a PNG, without it it says
so and exits 0.
"""

import argparse
import csv
import sys
from pathlib import Path

import numpy as np

import edgewatch


def read_csv(path: Path, time_column: str, value_column: str):
    """(timestamps in ms as int64, values as float64) of the CSV's two columns; empty cells: NaN."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise SystemExit(f"{path}: no data rows")
    names = list(rows[0])
    time_column = time_column or names[0]
    value_column = value_column or names[1]
    for c in (time_column, value_column):
        if c not in names:
            raise SystemExit(f"{path}: no column {c!r} (columns: {', '.join(names)})")
    raw = [r[time_column].strip() for r in rows]
    if all(t.lstrip("-").isdigit() for t in raw):
        ts = np.array([int(t) for t in raw], dtype=np.int64)
    else:
        ts = np.array(raw, dtype="datetime64[ms]").astype(np.int64)
    values = np.array([float(r[value_column]) if r[value_column].strip() else np.nan for r in rows])
    return ts, values


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("csv", type=Path)
    p.add_argument("--detector", default="ensemble", help=f"a preset: {', '.join(edgewatch.PRESETS)}")
    p.add_argument("--time-column", default="")
    p.add_argument("--value-column", default="")
    p.add_argument("--window-ms", type=int, default=3_600_000, help="summary window (default 1 h)")
    p.add_argument("--png", type=Path, help="plot file (default: the CSV's name with .png)")
    args = p.parse_args(argv)

    ts, values = read_csv(args.csv, args.time_column, args.value_column)
    det = edgewatch.Detector.preset(args.detector)
    scores = det.score(ts, values)
    alarms = edgewatch.alarm_scores(scores, det.threshold)
    order = np.argsort(ts, kind="stable")
    w = edgewatch.windows(ts[order], values[order], args.window_ms, scores=scores[order], late="drop")
    # The gate passes a score while armed (0 during an episode): an event is one at the threshold.
    at = np.flatnonzero(alarms >= det.threshold)
    print(f"{args.csv}: {len(ts)} readings, {len(w['start_ms'])} windows of {args.window_ms} ms")
    print(f"detector {det.name}, threshold {det.threshold}: {len(at)} alarms")
    for i in at[:20]:
        print(f"  {np.datetime64(int(ts[i]), 'ms')}  value {values[i]:.6g}  score {scores[i]:.3f}")

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install matplotlib): no plot written")
        return 0
    png = args.png or args.csv.with_suffix(".png")
    when = ts.astype("datetime64[ms]")
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(12, 6))
    top.plot(when, values, lw=0.6)
    top.scatter(when[at], values[at], color="red", s=12, zorder=3, label="alarm")
    top.set_ylabel("value")
    top.legend(loc="upper right")
    bottom.plot(when, scores, lw=0.6, color="gray")
    bottom.axhline(det.threshold, color="red", lw=0.8, ls="--", label="threshold")
    bottom.set_ylabel(f"{det.name} score")
    bottom.set_ylim(0, 1)
    bottom.legend(loc="upper right")
    fig.suptitle(args.csv.name)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    print(f"plot written to {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
