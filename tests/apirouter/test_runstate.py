"""Run directories: one live router each, private, with a stable instance id."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from typing import Any

import pytest

from apirouter.runstate import RunDir, RunDirError, live_workers, supervisor_alive, write_state
from tests.harness import ROOT

HOLD = ("import sys, time\n"
        "from apirouter.runstate import RunDir\n"
        "r = RunDir.claim(sys.argv[1])\n"
        "print(r.instance, flush=True)\n"
        "time.sleep(60)\n")


def _holder(path: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, path], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE)
    assert proc.stdout is not None
    return proc, proc.stdout.readline().strip()


def test_a_live_claim_refuses_a_second_one_and_dies_with_its_holder(tmp_path: Any) -> None:
    run = str(tmp_path / "run")
    proc, instance = _holder(run)
    try:
        write_state(run, {"pid": proc.pid, "bind": "127.0.0.1:9"})
        assert supervisor_alive(run)
        with pytest.raises(RunDirError, match=f"supervisor pid {proc.pid}, serving "
                                              "127.0.0.1:9.*--run-dir"):
            RunDir.claim(run, wait_s=0.2)
    finally:
        proc.send_signal(signal.SIGKILL)  # however it dies, the kernel drops the lock
        proc.wait()
    assert not supervisor_alive(run)
    again = RunDir.claim(run)
    assert again.instance == instance  # the same instance: it finds its segments again
    again.release()


def test_a_run_directory_others_can_write_is_made_private_or_refused(tmp_path: Any) -> None:
    mine = tmp_path / "mine"
    mine.mkdir(mode=0o777)
    os.chmod(mine, 0o777)
    RunDir.claim(str(mine)).release()
    assert os.stat(mine).st_mode & 0o777 == 0o700
    link = tmp_path / "link"
    link.symlink_to(mine)
    with pytest.raises(RunDirError, match="not a directory"):
        RunDir.claim(str(link))
    if os.geteuid() == 0:
        theirs = tmp_path / "theirs"
        theirs.mkdir()
        os.chown(theirs, 65534, 65534)
        with pytest.raises(RunDirError, match="belongs to uid 65534"):
            RunDir.claim(str(theirs))


def test_workers_holding_slots_are_seen_as_an_orphaned_pool(tmp_path: Any) -> None:
    run = str(tmp_path / "run")
    RunDir.claim(run).release()
    code = ("import fcntl, os, sys, time\n"
            "fd = os.open(os.path.join(sys.argv[1], 'slots', '3.lock'), os.O_RDWR | os.O_CREAT)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX)\n"
            "print('held', flush=True)\n"
            "time.sleep(60)\n")
    os.makedirs(os.path.join(run, "slots"))
    proc = subprocess.Popen([sys.executable, "-c", code, run], text=True,
                            stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        assert live_workers(run) == 1
        claimed = RunDir.claim(run)
        assert claimed.orphans == 1
        claimed.release()
    finally:
        proc.kill()
        proc.wait()
    assert live_workers(run) == 0
