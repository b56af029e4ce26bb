"""The pipeline's last step: metrics, the usage record and settlement of one request.

Everything here reads the request context; what to count and how to settle comes from the
request's Outcome (apirouter.outcomes), so every endpoint accounts alike. Accounting never
fails a response: a record that cannot be handed off is counted and logged, not raised.

The usage record is written before the response goes out: once a client has its answer, the
record is in shared memory and survives the worker (a SIGKILL included). Metrics and the
settlement of the reservation wait (``flush``): done inline they sat between the backend's
answer and the client's. In-process they wait for the end of the event-loop turn (queued with
call_soon: after the turn's callbacks, before the loop waits for I/O again). With Redis
admission they wait FLUSH_DELAY_S at most (a timer armed by the first request queued), or for
FLUSH_MAX requests, and go together: at a turn's end a lone request's (c=1) settlement woke
Redis on the core the worker shares with the backend just as the client sent its next request
(perf record, c=1: the next request read ~150 µs after it was sent, against ~40 µs with the
settlement held back). Routers of this and the turn-end flush side by side, wrk c=1 legs
alternating, 20 rounds: added p50 0.274 -> 0.245 ms (paired difference, median: -14 µs p50,
-17.5 µs mean); the settlement alone on a timer (metrics at the turn's end): +0.5 µs. In-process
the timer cost more than it saved (40 rounds: +7.5 µs p50, +13 µs mean): the turn-end flush
runs while the client turns round, a timer's flush lands on some request.
A worker that stops flushes first; one killed loses what waited (at most FLUSH_DELAY_S of
metrics and refunds: the reservations then stay as estimated), never a usage record.
"""

from __future__ import annotations

import asyncio
import logging
import time

from apirouter.errors import RouterError
from apirouter.usage import encode_record
from workers.admission import Admission
from workers.context import RequestContext
from workers.metrics import USAGE_LOST, RequestMetrics, Routed, before_exposition
from workers.usage_out import UsageOut

log = logging.getLogger("apirouter.worker")

FLUSH_DELAY_S = 0.005  # with Redis: the longest a request's metrics and settlement wait
FLUSH_MAX = 256  # requests waiting that flush at the end of the turn (bounds what is held)


class Accounting:
    def __init__(self, admission: Admission, metrics: RequestMetrics, usage: UsageOut | None,
                 pid: int, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop  # held: asking for the running loop costs a getpid system call
        self.admission = admission
        self.metrics = metrics
        self.usage = usage
        self.pid = pid
        self._due: list[RequestContext] = []  # counted and settled by flush
        self._timer: asyncio.TimerHandle | None = None  # the flush of those, FLUSH_DELAY_S on
        before_exposition(self.flush)  # a scrape of this worker counts them all
        admission.before_read = self.flush  # and a budget read sees them settled

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
        outcome, request = ctx.outcome, ctx.request
        assert outcome is not None and request is not None
        ctx.accounted = True
        usage = self.usage
        if usage is not None:
            # The record built from the context itself (encode_record reads its fields) and
            # handed to the ring's C put inline: no Python call between them.
            record = encode_record(
                "request", ctx, request.model, time.time(), status, outcome.error_code,
                ctx.used if outcome.settle_actual else None, self.pid, request.stream)
            if not usage.put(record):
                self._overflow(usage, ctx.request_id, record)
        due = self._due
        due.append(ctx)
        if len(due) == 1:
            if self.admission.redis is None:  # in-process: at the end of the turn
                self.loop.call_soon(self.flush)
            else:
                self._timer = self.loop.call_later(FLUSH_DELAY_S, self.flush)
        elif len(due) == FLUSH_MAX:
            self.loop.call_soon(self.flush)
        ticket = ctx.ticket
        if ticket is None:
            return []
        # Made while the backend worked (the pipeline's ``meanwhile``): read, not called again.
        headers = ticket.headers
        return headers if headers is not None else ticket.rate_limit_headers()

    def flush(self) -> None:
        """Count and settle every queued request (idempotent; the worker calls it before it
        stops): what the metrics count of each goes to ``routed``, and the settlement of its
        reservation is queued. The step of one request is inlined in the loop (no call a
        request: ~0.15 µs) and each runs under its own guard."""
        due, self._due = self._due, []
        timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()  # (a no-op when it is the timer that called)
        routed: list[Routed] = []
        count = routed.append
        queue_settlement = self.admission.queue_settlement
        for ctx in due:
            try:
                fwd, outcome, request = ctx.fwd, ctx.outcome, ctx.request
                assert outcome is not None and request is not None
                if fwd is not None:
                    response, backend_s = fwd.response, fwd.backend_s
                    count((fwd.backend_id, fwd.decision_type, outcome.success, request.model,
                           response.status if response is not None else 0, backend_s,
                           max(0.0, ctx.total_s - backend_s)))
                ticket = ctx.ticket
                if ticket is None:
                    continue
                if not outcome.settle_actual:  # released: nothing was produced
                    queue_settlement(ctx.view.table.limits, ticket, 0, 0)
                elif (used := ctx.used) is not None:
                    queue_settlement(ctx.view.table.limits, ticket, used[0] + used[1],
                                     ctx.cost_micro)
                # Without reported usage the reservation stays as it was made.
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
            # Refused at admission: never forwarded (ctx.fwd is None), nothing used.
            self.emit(ctx.request_id, encode_record(
                "denial", ctx, ctx.request.model, time.time(), err.status, err.code, None,
                self.pid, False, limit, retry_after_s))
        return err
