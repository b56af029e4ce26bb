"""Real processes on loopback for the bench suite and the tests: the mock backend, the router
(`apirouter serve` as a user runs it), redis-server and an nginx keep-alive hop, each on an
ephemeral port with its output in a log file, stopped with TERM then KILL. Ships with the
package (``apirouter bench --local`` starts these); tests/harness.py re-exports them beside the
services only tests use (etcd, the Kafka-protocol broker).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from apirouter.runstate import live_workers

HOST = "127.0.0.1"
ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


def port_open(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.2):
            return True
    except OSError:
        return False


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def wait_for(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.02)
    raise TimeoutError(f"{what} not ready after {timeout}s")


class ManagedProcess:
    """A subprocess with its output in a log file, stopped with TERM then KILL."""

    port: int  # where a server subclass listens

    def __init__(self, name: str, cmd: list[str], *, env: dict[str, str] | None = None,
                 cwd: str | None = None) -> None:
        self.name = name
        self.cmd = cmd
        self.dir = tempfile.mkdtemp(prefix=f"apirouter-test-{name}-")
        self.log_path = os.path.join(self.dir, "output.log")
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                     env=env, cwd=cwd or self.dir, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        if not self._log.closed:
            self._log.flush()
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def ensure_running(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.output()}")

    def await_ready(self, check: Callable[[], bool], timeout: float, what: str) -> None:
        """``wait_for(check)``, stopping this process if it never gets ready: the caller gets
        no object to stop (its constructor raised), so a half-started server would outlive
        the run, holding a port and CPU."""
        try:
            wait_for(check, timeout, what)
        except BaseException:
            self.stop()
            self.cleanup()
            raise

    def listening(self) -> bool:
        """Running, and accepting connections on ``self.port`` (set by the subclass)."""
        self.ensure_running()
        return port_open(self.port)

    def stop(self, timeout: float = 15.0, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if not self._log.closed:
            self._log.close()
        return self.proc.returncode

    def cleanup(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


# -- services -----------------------------------------------------------------------------------


class RedisServer(ManagedProcess):
    def __init__(self, port: int | None = None) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise FileNotFoundError("redis-server is not installed (tools/test.sh installs it)")
        self.port = port or free_port()
        super().__init__("redis", [binary, "--bind", HOST, "--port", str(self.port), "--save", "",
                                   "--appendonly", "no", "--daemonize", "no"])
        self.await_ready(self._ping, 10, "redis-server")

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def restarted(self) -> RedisServer:
        """Stop this server and start an empty one on the same port."""
        self.stop()
        self.cleanup()
        return RedisServer(self.port)

    def _ping(self) -> bool:
        self.ensure_running()
        with socket.create_connection((HOST, self.port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")


# -- the project's own processes ----------------------------------------------------------------


class MockBackend(ManagedProcess):
    def __init__(self, name: str = "mock", *args: str, port: int | None = None) -> None:
        self.port = port or free_port()
        self.backend_name = name
        super().__init__(f"mock-{name}", [
            sys.executable, "-m", "tools.mock_backend", "--bind", f"{HOST}:{self.port}",
            "--name", name, *args], cwd=str(ROOT))
        self.await_ready(self.listening, 10, name)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def configure(self, **behaviour: Any) -> dict[str, Any]:
        req = urllib.request.Request(f"{self.url}/mock/config", data=json.dumps(behaviour).encode(),
                                     method="POST")
        with urllib.request.urlopen(req, timeout=2) as r:
            result: dict[str, Any] = json.loads(r.read())
            return result

    def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(http_get(f"{self.url}/mock/stats")[1])
        return result


class Router(ManagedProcess):
    """`apirouter serve` as a user runs it, with its own config file and run directory."""

    def __init__(self, config: dict[str, Any] | None, *, workers: int = 2, demo: bool = False,
                 etcd: str | None = None, extra: list[str] | None = None,
                 port: int | None = None, run_dir: str | None = None,
                 root: Path | None = None) -> None:
        """``root``: the checkout to run (default this one; bench.feature_cost runs copies)."""
        self.port = port or free_port()
        self.workers = workers
        self.run_dir = run_dir or tempfile.mkdtemp(prefix="apirouter-run-")
        self.config_path = os.path.join(self.run_dir, "router.yaml")
        if config is not None:
            self.write_config(config)
        cmd = [sys.executable, "-m", "tools.cli", "serve", "--bind", f"{HOST}:{self.port}",
               "--workers", str(workers), "--run-dir", self.run_dir]
        if demo:
            cmd += ["--demo"]
        elif etcd:
            cmd += ["--etcd", etcd]
        else:
            cmd += ["--config", self.config_path]
        super().__init__("router", cmd + (extra or []), cwd=str(root or ROOT))
        self.await_ready(self._ready, 30, "router")

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def write_config(self, config: dict[str, Any]) -> None:
        tmp = self.config_path + ".tmp"
        with open(tmp, "w") as f:
            yaml.safe_dump(config, f)
        os.replace(tmp, self.config_path)

    def state(self) -> dict[str, Any]:
        with open(os.path.join(self.run_dir, "supervisor.json")) as f:
            result: dict[str, Any] = json.load(f)
            return result

    def _ready(self) -> bool:
        """Ready once readyz answers, this supervisor has written its state (in a reused run
        directory, a previous router's workers may still answer) and every worker holds its
        slot: the first worker up answers readyz while the others may still be booting, and a
        test that wants to reach each worker (or a bench that wants them all) must not start
        before they are. A worker claims its slot as it builds its app, just before it
        listens."""
        self.ensure_running()
        if http_get(f"{self.url}/v1/status/readyz", timeout=1)[0] != 200:
            return False
        try:
            state = self.state()
        except (FileNotFoundError, ValueError):
            return False
        return state.get("pid") == self.pid and live_workers(self.run_dir) >= self.workers

    def readyz(self) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(http_get(f"{self.url}/v1/status/readyz")[1])
        return result

    def cleanup(self) -> None:
        shutil.rmtree(self.run_dir, ignore_errors=True)
        super().cleanup()


def router_config(backends: dict[str, str], models: dict[str, dict[str, int]],
                  keys: dict[str, dict[str, Any]] | None = None, **server: Any
                  ) -> dict[str, Any]:
    """A config dict: backends {id: url}, models {name: {backend_id: weight}}; without
    ``keys`` the router runs with authentication off."""
    cfg: dict[str, Any] = {
        "server": {"auth_required": keys is not None, **server},
        "backends": {bid: {"url": url} for bid, url in backends.items()},
        "models": {m: {"backends": [{"backend": b, "weight": w} for b, w in targets.items()]}
                   for m, targets in models.items()},
    }
    if keys is not None:
        cfg["keys"] = keys
    return cfg


class FloorProxy(ManagedProcess):
    """bench.floor_proxy in front of ``upstream`` (HOST:PORT): what a proxy on the router's
    stack costs a request before any work of its own (bench.overhead's ``--floor`` leg)."""

    def __init__(self, upstream: str, *, port: int | None = None) -> None:
        self.port = port or free_port()
        super().__init__("floor", [sys.executable, "-m", "bench.floor_proxy", "--port",
                                   str(self.port), "--upstream", upstream], cwd=str(ROOT))
        self.await_ready(self.listening, 10, "floor proxy")

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"


class Nginx(ManagedProcess):
    """Debian's nginx as a one-hop keep-alive reverse proxy to ``upstream`` (HOST:PORT), with a
    generated config under its own prefix directory (``-p DIR -c FILE``, ``daemon off;``):
    the same-run comparison point for the router. Buffering is off so SSE passes through."""

    def __init__(self, upstream: str, *, workers: int = 1, port: int | None = None,
                 keepalive: int = 64) -> None:
        binary = shutil.which("nginx") or "/usr/sbin/nginx"
        if not os.access(binary, os.X_OK):
            raise FileNotFoundError("nginx is not installed (tools/setup.sh test installs it)")
        self.port = port or free_port()
        prefix = tempfile.mkdtemp(prefix="apirouter-nginx-")
        self.prefix = prefix
        conf = os.path.join(prefix, "nginx.conf")
        with open(conf, "w") as f:
            f.write(nginx_config(prefix, self.port, upstream, workers, keepalive))
        super().__init__("nginx", [binary, "-p", prefix, "-c", conf, "-e", "stderr"])
        self.await_ready(self.listening, 10, "nginx")

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def cleanup(self) -> None:
        shutil.rmtree(self.prefix, ignore_errors=True)
        super().cleanup()


def nginx_config(prefix: str, port: int, upstream: str, workers: int, keepalive: int) -> str:
    user = "user root;\n" if os.geteuid() == 0 else ""
    temps = "\n".join(f"    {k}_temp_path {prefix}/{k};" for k in (
        "client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    return f"""daemon off;
{user}worker_processes {workers};
pid {prefix}/nginx.pid;
error_log stderr warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
{temps}
    upstream backend {{
        server {upstream};
        keepalive {keepalive};
    }}
    server {{
        listen {HOST}:{port} reuseport backlog=4096;
        keepalive_requests 1000000;
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_read_timeout 120s;
        }}
    }}
}}
"""


def process_tree_cpu(pid: int) -> tuple[float, float]:
    """CPU seconds (user+system) of a process and all its live descendants, and of the
    process alone: from /proc/PID/task/*/schedstat (nanoseconds) where Linux has it, else
    psutil's clock-tick figures (10 ms steps: too coarse for a short run)."""
    import psutil

    root = psutil.Process(pid)
    total = own = 0.0
    for p in [root, *root.children(recursive=True)]:
        try:
            t = _schedstat_s(p.pid)
            if t is None:
                ct = p.cpu_times()
                t = ct.user + ct.system
        except (psutil.NoSuchProcess, ProcessLookupError):
            continue
        total += t
        if p is root:
            own = t
    return total, own


def machine_steal() -> tuple[int, int] | None:
    """(steal, all) clock ticks of every CPU since boot, from /proc/stat: on a VM, steal is
    the time the hypervisor ran something else while this machine had work to run. The
    share of a leg's ticks that was steal tells how much the host, not the code measured,
    moved that leg's figures. None where /proc/stat has no steal field."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if len(fields) < 9 or fields[0] != "cpu":
        return None
    # user nice system idle iowait irq softirq steal [guest guest_nice: inside user, nice]
    ticks = [int(x) for x in fields[1:9]]
    return ticks[7], sum(ticks)


def steal_share(before: tuple[int, int] | None, after: tuple[int, int] | None
                ) -> float | None:
    """The share (0..1) of the CPUs' ticks between two machine_steal readings that was
    steal."""
    if before is None or after is None or after[1] <= before[1]:
        return None
    return (after[0] - before[0]) / (after[1] - before[1])


def _schedstat_s(pid: int) -> float | None:
    """CPU seconds of all threads of ``pid``; None where /proc has no schedstat."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        raise ProcessLookupError(pid) from None
    except OSError:
        return None
    ns = 0
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                ns += int(f.read().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            continue  # a thread that just ended
        except (OSError, ValueError, IndexError):
            return None
    return ns / 1e9
