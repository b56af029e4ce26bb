"""The run directory: its claim by one live supervisor, its instance id, and the state file.

The state file is how `apirouterctl` finds a running router: written atomically (temp file +
rename) by the supervisor into its run directory; read by tools. It holds pids and segment
names, never secrets.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import secrets
import shutil
import stat
import tempfile
import time
from typing import Any

log = logging.getLogger("apirouter.supervisor")

STATE_FILE = "supervisor.json"


def default_run_dir() -> str:
    return os.environ.get("APIROUTER_RUN_DIR") or os.path.join(
        tempfile.gettempdir(), f"apirouter-{os.getuid()}")


def write_state(run_dir: str, state: dict[str, Any]) -> str:
    os.makedirs(run_dir, mode=0o700, exist_ok=True)
    path = os.path.join(run_dir, STATE_FILE)
    fd, tmp = tempfile.mkstemp(dir=run_dir, prefix=".supervisor.")
    with os.fdopen(fd, "w") as f:
        json.dump(state, f, indent=2, sort_keys=True)
    os.replace(tmp, path)
    return path


def read_state(run_dir: str) -> dict[str, Any]:
    with open(os.path.join(run_dir, STATE_FILE), encoding="utf-8") as f:
        state: dict[str, Any] = json.load(f)
    return state


def remove_state(run_dir: str) -> None:
    try:
        os.unlink(os.path.join(run_dir, STATE_FILE))
    except FileNotFoundError:
        pass


def pid_alive(pid: int) -> bool:
    """True while the process exists and is not a zombie waiting to be reaped."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            # The state follows the parenthesised command name, which may contain spaces.
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True


# -- the run directory: one live router at a time ----------------------------------------------

LOCK_FILE = "supervisor.lock"
INSTANCE_FILE = "instance"
SLOTS_DIR = "slots"
METRICS_DIR = "metrics"
CLAIM_WAIT_S = 2.0  # workers probe the lock for a few microseconds now and then


class RunDirError(RuntimeError):
    """The run directory cannot be used: unsafe, or held by a live router."""


def secure_run_dir(path: str) -> None:
    """Create the run directory private to this user, or check one that exists: it must be a
    real directory owned by this user; one that others can write is made private (ours) or
    refused (someone else's: a root-owned world-writable mount, say, is not a run directory
    but a place for one — point --run-dir at a directory inside it)."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise RunDirError(f"run directory {path} is not a directory (a symlink or a file)")
    if st.st_uid != os.geteuid():
        raise RunDirError(f"run directory {path} belongs to uid {st.st_uid}, not to this user "
                          f"({os.geteuid()}): choose another with --run-dir or "
                          f"APIROUTER_RUN_DIR")
    if st.st_mode & 0o022:
        os.chmod(path, 0o700)
        log.warning("run directory %s was open to other users (mode %o); made it private",
                    path, stat.S_IMODE(st.st_mode))


def file_locked(path: str, kind: int = fcntl.LOCK_SH) -> bool:
    """True if another open file holds a conflicting flock on ``path``."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, kind | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops the probe's own lock at once


def supervisor_alive(run_dir: str) -> bool:
    """Whether a supervisor holds this run directory: a lock, not a pid, so it means the same
    in every PID namespace. Cheap enough for a worker's heartbeat."""
    return file_locked(os.path.join(run_dir, LOCK_FILE), fcntl.LOCK_SH)


def live_workers(run_dir: str) -> int:
    """Worker slots held right now (each worker holds the flock of the slot it claimed)."""
    directory = os.path.join(run_dir, SLOTS_DIR)
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return 0
    return sum(file_locked(os.path.join(directory, n), fcntl.LOCK_SH) for n in names
               if n.endswith(".lock"))


class RunDir:
    """A claimed run directory: the supervisor holds ``supervisor.lock`` (an exclusive flock,
    released by the kernel however the supervisor dies) for as long as it runs. The instance
    id, kept in the directory, names this router's shared-memory segments, so a restart —
    in another PID namespace too — finds its predecessor's segments, and routers with other
    run directories never touch them."""

    def __init__(self, path: str, fd: int, instance: str, orphans: int) -> None:
        self.path = path
        self._fd = fd
        self.instance = instance
        self.orphans = orphans  # workers of a previous supervisor still serving at claim time
        self.metrics_dir = os.path.join(path, METRICS_DIR)

    @classmethod
    def claim(cls, path: str, wait_s: float = CLAIM_WAIT_S) -> RunDir:
        path = os.path.abspath(path)
        secure_run_dir(path)
        fd = os.open(os.path.join(path, LOCK_FILE), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(fd)
                    raise RunDirError(_in_use(path)) from None
                time.sleep(0.01)
        try:
            instance = _instance(path)
            orphans = live_workers(path)
            metrics_dir = os.path.join(path, METRICS_DIR)
            if not orphans:  # nobody writes there: start the metrics afresh
                shutil.rmtree(metrics_dir, ignore_errors=True)
            os.makedirs(metrics_dir, mode=0o700, exist_ok=True)
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd, instance, orphans)

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _instance(path: str) -> str:
    """This run directory's instance id, made once (under the lock) and kept."""
    file = os.path.join(path, INSTANCE_FILE)
    try:
        with open(file, encoding="ascii") as f:
            value = f.read().strip()
        if value.isalnum() and 4 <= len(value) <= 24:
            return value
    except FileNotFoundError:
        pass
    value = secrets.token_hex(6)
    fd, tmp = tempfile.mkstemp(dir=path, prefix=".instance.")
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")
    os.replace(tmp, file)
    return value


def _in_use(path: str) -> str:
    try:
        state = read_state(path)
        who = f" (supervisor pid {state.get('pid')}, serving {state.get('bind')})"
    except (OSError, ValueError):
        who = ""
    return (f"run directory {path} is in use by a live router{who}: give this one its own "
            f"with --run-dir or APIROUTER_RUN_DIR")
