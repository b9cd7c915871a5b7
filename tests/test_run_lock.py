"""One run at a time per run folder: a live run's folder is refused to a second one; a dead run's is not."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

import pytest

from deltatune.run_folder import RunFolderBusy, run_lock
from tiny_assets import check_ok, invoke, session_assets, train_args


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return session_assets(tmp_path_factory)


HOLD = textwrap.dedent(
    """
    import os, signal, sys
    from deltatune.run_folder import run_lock
    with run_lock(sys.argv[1]):
        print("held", flush=True)
        if sys.argv[2] == "crash":
            os.kill(os.getpid(), signal.SIGKILL)
        sys.stdin.readline()
    """
)


def hold_in_another_process(folder, how):
    process = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(folder), how], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert process.stdout.readline().strip() == "held"
    return process


def test_a_second_run_into_a_live_runs_folder_is_refused_and_changes_nothing(assets, tmp_path):
    output = tmp_path / "run"
    check_ok(invoke(*train_args(assets, output, "--max-steps", "2")))
    before = {p.relative_to(output): p.read_bytes() for p in output.rglob("*") if p.is_file()}
    holder = hold_in_another_process(output, "wait")
    try:
        for extra in (("--overwrite",), ("--resume",), ()):
            result = invoke(*train_args(assets, output, "--max-steps", "2", *extra))
            assert result.exit_code != 0
            assert "in use by another deltatune run" in result.output and f"process {holder.pid}" in result.output
        assert {p.relative_to(output): p.read_bytes() for p in output.rglob("*") if p.is_file()} == before
    finally:
        holder.communicate("\n", timeout=60)
    check_ok(invoke(*train_args(assets, output, "--max-steps", "2", "--overwrite")))


def test_a_killed_run_leaves_no_lock_behind(tmp_path):
    holder = hold_in_another_process(tmp_path / "run", "crash")
    assert holder.wait(60) == -signal.SIGKILL
    with run_lock(tmp_path / "run"):
        with pytest.raises(RunFolderBusy, match="in use"):
            with run_lock(tmp_path / "run"):  # a second holder, even in this process
                pass
    with run_lock(tmp_path / "run"):
        pass
