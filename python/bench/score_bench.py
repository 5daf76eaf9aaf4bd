"""Throughput of edgewatch's detectors from Python: `Detector.score()` over whole numpy arrays, the
same detector fed one `update()` call per reading, and River's Half-Space Trees (when `river` is
installed) in the same process, on one NAB file; plus `score()` on the synthetic series the Rust
criterion benchmark uses (`cargo bench -p edgewatch-models --bench detectors`), for a like-for-like
comparison with its readings/s. A script, not a test: it prints a table and the load average.

    python python/bench/score_bench.py [--file realKnownCause/nyc_taxi.csv] [--repeat 5]

The NAB corpus is found like the tests find it: $EDGEWATCH_NAB_DIR, else <repo>/../shared/datasets/nab.
"""

import argparse
import csv
import math
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

import edgewatch

REPO = Path(__file__).resolve().parents[2]


def nab_dir() -> Path:
    env = os.environ.get("EDGEWATCH_NAB_DIR")
    d = Path(env) if env else REPO / ".." / "shared" / "datasets" / "nab"
    if not (d / "data").is_dir():
        sys.exit(f"NAB corpus not found at {d} (set EDGEWATCH_NAB_DIR)")
    return d


def read_nab(path: Path):
    ts, values = [], []
    with open(path, newline="") as f:
        rows = csv.reader(f)
        next(rows)
        for row in rows:
            if row:
                t = datetime.strptime(row[0].strip(), "%Y-%m-%d %H:%M:%S").replace(tzinfo=timezone.utc)
                ts.append(int(t.timestamp()) * 1000)
                values.append(float(row[1]))
    return np.array(ts, dtype=np.int64), np.array(values, dtype=np.float64)


def sensor(n: int, seed: int):
    """models/benches/detectors.rs's `sensor` series (xorshift64* + Box-Muller), bit for bit."""
    mask = (1 << 64) - 1
    state = seed
    out = np.empty(n)

    def uniform():
        nonlocal state
        state ^= state >> 12
        state ^= (state << 25) & mask
        state ^= state >> 27
        return (((state * 0x2545F4914F6CDD1D) & mask) >> 11) + 0.5

    for i in range(n):
        a, b = uniform() / (1 << 53), uniform() / (1 << 53)
        normal = math.sqrt(-2.0 * math.log(a)) * math.cos(math.tau * b)
        t = float(i)
        cycle = 5.0 * math.sin(math.tau * t / 86_400.0)
        spike = 10.0 if i % 997 == 0 else 0.0
        out[i] = 20.0 + cycle + t * 1e-5 + normal + spike
    return np.arange(n, dtype=np.int64) * 1000, out


def best_of(repeat: int, run) -> float:
    """Best wall time of `repeat` runs, seconds."""
    best = math.inf
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--file", default="realKnownCause/nyc_taxi.csv", help="NAB data file (category/name.csv)")
    ap.add_argument("--repeat", type=int, default=5, help="runs per measurement (the best is kept)")
    ap.add_argument("--river-rows", type=int, default=0, help="rows fed to River (default: the whole file)")
    args = ap.parse_args()

    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}, {os.cpu_count()} cpus")
    ts, values = read_nab(nab_dir() / "data" / args.file)
    n = len(ts)
    print(f"{args.file}: {n} readings; best of {args.repeat} runs\n")
    rows = []

    for preset in ("ensemble", "hst", "ewma"):
        secs = best_of(args.repeat, lambda: edgewatch.Detector.preset(preset).score(ts, values))
        rows.append((f"edgewatch {preset}: Detector.score(ts, values)", n, secs))

    def per_call():
        det = edgewatch.Detector.preset("ensemble")
        update = det.update
        for t, v in zip(ts.tolist(), values.tolist()):
            update(t, v)

    secs = best_of(args.repeat, per_call)
    rows.append(("edgewatch ensemble: one update() call per reading", n, secs))

    try:
        from river import anomaly, preprocessing
    except ImportError:
        print("river is not installed: no River row (pip install river)\n")
    else:
        m = args.river_rows or n
        xs = [{"value": v} for v in values[:m].tolist()]

        def river_hst():
            model = preprocessing.MinMaxScaler() | anomaly.HalfSpaceTrees(seed=42)
            for x in xs:
                model.score_one(x)
                model.learn_one(x)

        import river

        secs = best_of(1, river_hst)
        rows.append((f"River {river.__version__} HalfSpaceTrees (MinMaxScaler |, defaults): score_one + learn_one", m, secs))

    # The Rust criterion benchmark's setup: warm on 10,000 readings, time the next 100,000.
    wts, wvalues = sensor(110_000, 7)
    for preset in ("ensemble", "hst"):
        warm = edgewatch.Detector.preset(preset)
        warm.score(wts[:10_000], wvalues[:10_000])
        state = warm.state()
        rest_ts, rest_values = wts[10_000:], wvalues[10_000:]
        secs = best_of(args.repeat, lambda: edgewatch.Detector.from_state(state).score(rest_ts, rest_values))
        rows.append((f"edgewatch {preset}: score() on criterion's synthetic series (warm)", 100_000, secs))

    river_rate = next((c / t for w, c, t in rows if w.startswith("River")), None)
    width = max(len(r[0]) for r in rows)
    print(f"{'what':<{width}}  {'readings':>9}  {'seconds':>9}  {'readings/s':>12}  {'x River':>8}")
    for what, count, secs in rows:
        ratio = f"{count / secs / river_rate:>8,.0f}" if river_rate else f"{'-':>8}"
        print(f"{what:<{width}}  {count:>9}  {secs:>9.4f}  {count / secs:>12,.0f}  {ratio}")
    print(f"\nload average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
