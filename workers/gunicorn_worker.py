"""The gunicorn worker class: aiohttp on uvloop, with stop signals that cannot be lost.

A stop signal can reach a worker at any point of its boot: before its event loop exists, while
the app module is imported, or while it serves. With loop-based handlers alone, a TERM that
arrives before the loop runs was dropped, and the worker served on until the master killed it
at the graceful timeout (seen as 30 s drains). Plain handlers that only flip ``alive`` and wake
the serve loop work in every phase; gunicorn_conf blocks the signals across fork() so the
window before they are installed is covered too.
"""

from __future__ import annotations

import signal
from types import FrameType

from aiohttp.worker import GunicornUVLoopWebWorker

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)


class RouterWorker(GunicornUVLoopWebWorker):
    def init_signals(self) -> None:
        super().init_signals()
        for sig in STOP_SIGNALS:
            signal.signal(sig, self.request_stop)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)

    def request_stop(self, signum: int, frame: FrameType | None) -> None:
        self.alive = False
        loop = getattr(self, "loop", None)
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._notify_waiter_done)
