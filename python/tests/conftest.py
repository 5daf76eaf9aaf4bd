"""Shared fixtures: the repository root, the NAB corpus (found like tests/it/eval_nab.rs finds it) and
the `edgewatch` binary that produces Rust's reference scores."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def nab_dir() -> Path:
    """`$EDGEWATCH_NAB_DIR`, else `<repo>/../shared/datasets/nab`; a missing corpus fails, never skips."""
    env = os.environ.get("EDGEWATCH_NAB_DIR")
    d = Path(env) if env else REPO / ".." / "shared" / "datasets" / "nab"
    if not (d / "labels" / "combined_windows.json").is_file():
        pytest.fail(
            f"NAB corpus not found at {d} (set EDGEWATCH_NAB_DIR or put shared/ beside the repo)",
            pytrace=False,
        )
    return d.resolve()


@pytest.fixture(scope="session")
def edgewatch_bin() -> Path:
    """`$EDGEWATCH_BIN` if set (scripts/test sets it to the binary it just built), else the
    repository's binary built with cargo (`cargo build --bin edgewatch`)."""
    env = os.environ.get("EDGEWATCH_BIN")
    if env:
        p = Path(env)
        if not p.is_file():
            pytest.fail(f"EDGEWATCH_BIN={env} is not a file", pytrace=False)
        return p
    cargo = shutil.which("cargo")
    if cargo is None:
        pytest.fail("cargo not found: set EDGEWATCH_BIN to an edgewatch binary", pytrace=False)
    subprocess.run([cargo, "build", "--quiet", "--bin", "edgewatch"], cwd=REPO, check=True)
    target = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
    if not target.is_absolute():
        target = REPO / target
    return target / "debug" / "edgewatch"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """No test may skip silently: a skip (pytest.skip, importorskip, skipif) is reported as a failure."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped, and tests never skip here: {report.longrepr}"


def _runs_beside(call):
    """Runs `call` in a worker thread while this thread spins in Python; returns the CPU seconds
    (`time.thread_time`) each thread used meanwhile: (this thread's, the worker's)."""
    import threading
    import time

    started = threading.Event()
    worker_cpu = []

    def work():
        started.set()
        t0 = time.thread_time()
        call()
        worker_cpu.append(time.thread_time() - t0)

    worker = threading.Thread(target=work)
    worker.start()
    started.wait()
    t0 = time.thread_time()
    spins = 0
    while worker.is_alive():
        spins += 1
    main_cpu = time.thread_time() - t0
    worker.join()
    return main_cpu, worker_cpu[0], spins


# A call that releases the GIL lets a spinner beside it have more than this share of its CPU.
GIL_SHARE_MIN = 0.2


@pytest.fixture
def gil_share():
    """How much a long call lets other Python threads run: the CPU time a thread spinning in Python
    beside it gets, as a share of the call's own CPU time. CPU time, not wall time, so the machine's
    load matters less: beside a call that releases the GIL for its heavy part, a fairly scheduled
    spinner gets 0.5-1.1x the call's CPU (0.87-1.08 on an idle machine, 0.49 once in CI: copying the
    input and building the output hold the GIL, and scheduling on a busy 2-core machine is not
    exactly fair); beside a call that holds the GIL throughout it gets almost none (0.015-0.025,
    `sorted` in `test_detector.py`), since it then sleeps waiting for the GIL. Tests require more
    than GIL_SHARE_MIN, ten times the holding case."""

    def share(call):
        main_cpu, worker_cpu, spins = _runs_beside(call)
        assert worker_cpu > 0.02, f"the call used {worker_cpu:.3f} s of CPU: too short to tell"
        return main_cpu / worker_cpu, f"spinner {main_cpu:.3f} s ({spins} spins), call {worker_cpu:.3f} s"

    return share
