"""The pipeline's last step: metrics, the usage record and settlement of one request.

Everything here reads the request context; what to count and how to settle comes from the
request's Outcome (apirouter.outcomes), so every endpoint accounts alike. Accounting never
fails a response: a record that cannot be handed off is counted and logged, not raised.

The usage record is written before the response goes out: once a client has its answer, the
record is in shared memory and survives the worker (a SIGKILL included). Metrics and the
settlement of the reservation wait for the end of the event-loop turn (``flush``, queued with
call_soon: after the turn's callbacks, before the loop waits for I/O again); done inline they
sat between the backend's answer and the client's.
"""

from __future__ import annotations

import asyncio
import logging
import time

from apirouter.errors import RouterError
from apirouter.outcomes import Outcome
from apirouter.usage import encode_record, usage_record
from workers.admission import Admission
from workers.context import RequestContext
from workers.metrics import USAGE_LOST, RequestMetrics, Routed
from workers.usage_out import UsageOut

log = logging.getLogger("apirouter.worker")


class Accounting:
    def __init__(self, admission: Admission, metrics: RequestMetrics, usage: UsageOut | None,
                 pid: int, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop  # held: asking for the running loop costs a getpid system call
        self.admission = admission
        self.metrics = metrics
        self.usage = usage
        self.pid = pid
        self._due: list[RequestContext] = []  # counted and settled at the end of the turn

    def emit(self, request_id: str, record: bytes) -> None:
        """Hand a usage record to the supervisor; accounting never fails a response."""
        usage = self.usage
        if usage is not None and not usage.put(record):
            self._overflow(usage, request_id, record)

    @staticmethod
    def _overflow(usage: UsageOut, request_id: str, record: bytes) -> None:
        """A record the ring refused (full): to the overflow file, or counted as lost."""
        try:
            usage.overflow(record)
        except OSError as e:  # the overflow file unwritable
            USAGE_LOST.inc()
            log.error("usage record of request %s lost: ring full and %s", request_id, e)

    def account(self, ctx: RequestContext, status: int) -> list[tuple[str, str]]:
        """Record a forwarded request that ended with ``status`` and queue its metrics and
        settlement for the end of the turn; return the rate-limit headers to send."""
        outcome = ctx.outcome
        assert outcome is not None and ctx.request is not None
        ctx.accounted = True
        usage = self.usage
        if usage is not None:
            # The ring's put (C) inline: emit's two Python calls a request saved.
            record = self._record(ctx, status, outcome)
            if not usage.put(record):
                self._overflow(usage, ctx.request_id, record)
        self._due.append(ctx)
        if len(self._due) == 1:
            self.loop.call_soon(self.flush)
        ticket = ctx.ticket
        return ticket.rate_limit_headers() if ticket is not None else []

    def _record(self, ctx: RequestContext, status: int, outcome: Outcome) -> bytes:
        fwd = ctx.fwd
        used = ctx.used if outcome.settle_actual else None
        key = ctx.caller.key if ctx.caller is not None else None
        assert ctx.request is not None
        return encode_record(
            "request", ctx.request_id, ctx.t0, time.time(), ctx.endpoint.path,
            key.key_id if key else None, key.org if key else None, ctx.request.model,
            fwd.backend_id if fwd else None, fwd.decision_type if fwd else None,
            fwd.attempts if fwd else 0, status, outcome.error_code,
            used[0] if used else None, used[1] if used else None,
            ctx.cost_micro if used else 0, fwd.backend_s if fwd else 0.0,
            ctx.view.generation, self.pid, None, None, ctx.request.stream, ctx.ttft_s,
            ctx.events, ctx.interruption, ctx.usage_estimated and used is not None)

    def flush(self) -> None:
        """Count and settle every queued request (idempotent; the worker calls it before it
        stops)."""
        due, self._due = self._due, []
        routed: list[Routed] = []
        for ctx in due:
            try:
                self._settle(ctx, routed)
            except Exception:  # a bug of ours must not cost the other requests' settlement
                log.exception("accounting of request %s failed", ctx.request_id)
        try:
            self.admission.settle_queued()  # at once: not one loop iteration later
        except Exception:
            log.exception("the settlements of %d requests failed", len(due))
        if routed:
            try:
                self.metrics.routed_together(routed)
            except Exception:
                log.exception("the metrics of %d requests were not counted", len(routed))

    def _settle(self, ctx: RequestContext, routed: list[Routed]) -> None:
        """Queue the settlement of the request's reservation; add what the metrics count of it
        to ``routed``."""
        fwd, outcome = ctx.fwd, ctx.outcome
        assert outcome is not None and ctx.request is not None
        if fwd is not None:
            routed.append((fwd.backend_id, fwd.decision_type, outcome.success,
                           ctx.request.model,
                           fwd.response.status if fwd.response is not None else 0,
                           fwd.backend_s, max(0.0, ctx.total_s - fwd.backend_s)))
        ticket = ctx.ticket
        if ticket is None:
            return
        limits = ctx.view.table.limits
        if not outcome.settle_actual:  # released: nothing was produced
            self.admission.queue_settlement(limits, ticket, 0, 0)
        elif ctx.used is not None:
            self.admission.queue_settlement(limits, ticket, ctx.used[0] + ctx.used[1],
                                            ctx.cost_micro)
        # Without reported usage the reservation stays as it was made.

    def failed(self, ctx: RequestContext, err: RouterError) -> RouterError:
        """Account a forwarded request that ends with a catalog error; return the error,
        carrying the rate-limit headers."""
        headers = self.account(ctx, err.status)
        if headers:
            err.headers = {**(err.headers or {}), **dict(headers)}
        return err

    def denied(self, ctx: RequestContext, err: RouterError, limit: str,
               retry_after_s: int | None) -> RouterError:
        """Account an admission refusal like a request (kind denial) and return the error."""
        if self.usage is not None and ctx.caller is not None and ctx.request is not None:
            key = ctx.caller.key
            self.emit(ctx.request_id, usage_record(
                kind="denial", request_id=ctx.request_id, ts_start=ctx.t0, ts_end=time.time(),
                endpoint=ctx.endpoint.path, key_id=key.key_id, org=key.org,
                model=ctx.request.model, backend_id=None, decision_type=None, attempts=0,
                status=err.status, error_code=err.code, prompt_tokens=None,
                completion_tokens=None, cost_micro=0, backend_s=0.0,
                table_generation=ctx.view.generation, worker_pid=self.pid, limit=limit,
                retry_after_s=retry_after_s))
        return err
