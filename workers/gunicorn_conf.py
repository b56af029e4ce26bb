"""gunicorn settings for the worker pool (``-c python:workers.gunicorn_conf``).

The supervisor passes bind, worker count and timeouts on the command line; what is fixed for
every deployment lives here.
"""

from __future__ import annotations

import os
import signal
from typing import Any

import uvloop  # noqa: F401  imported once in the master, so a forked worker boots faster

worker_class = "workers.gunicorn_worker.RouterWorker"
accesslog = None
# gunicorn 27 opens ~/.gunicorn/gunicorn.ctl by default; parallel instances would collide.
control_socket_disable = True


def child_exit(server: Any, worker: Any) -> None:
    # Dead workers' gauges must not linger in the multiprocess metrics directory.
    from prometheus_client import multiprocess

    from workers.metrics import WORKER_EXITS

    WORKER_EXITS.inc()
    try:
        multiprocess.mark_process_dead(worker.pid)
    except (OSError, ValueError):
        pass


_STOP = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)


def _block_stop_signals() -> None:
    signal.pthread_sigmask(signal.SIG_BLOCK, _STOP)


def _unblock_stop_signals() -> None:
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP)


def when_ready(server: Any) -> None:
    # A worker is born with stop signals blocked (a pending one waits, it is not lost) and
    # unblocks them once its own handlers are in place (RouterWorker.init_signals).
    os.register_at_fork(before=_block_stop_signals, after_in_parent=_unblock_stop_signals)
