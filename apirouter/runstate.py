"""The supervisor's state file: how `apirouterctl` finds a running router.

Written atomically (temp file + rename) by the supervisor into its run directory; read by
tools. It holds pids and segment names, never secrets.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

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
