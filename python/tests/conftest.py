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
