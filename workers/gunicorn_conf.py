"""gunicorn settings for the worker pool (``-c python:workers.gunicorn_conf``).

The supervisor passes bind, worker count and timeouts on the command line; what is fixed for
every deployment lives here.
"""

from __future__ import annotations

from typing import Any

worker_class = "aiohttp.GunicornUVLoopWebWorker"
# Clients of an inference router hold pooled keep-alive connections; don't drop them after 2 s.
keepalive = 75
accesslog = None
# gunicorn 27 opens ~/.gunicorn/gunicorn.ctl by default; parallel instances would collide.
control_socket_disable = True


def child_exit(server: Any, worker: Any) -> None:
    # Dead workers' gauges must not linger in the multiprocess metrics directory.
    from prometheus_client import multiprocess

    try:
        multiprocess.mark_process_dead(worker.pid)
    except (OSError, ValueError):
        pass
