"""The request path: join an experiment, assign and apply a variant, forward, stream back,
and hand a raw :class:`Outcome` to the recorder. Nothing here waits on Redis or computes
statistics; response bodies are interpreted later, off this path."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from starlette.types import Scope
from starlette.routing import get_route_path

from abproxy.assignment import Draw, random_draw
from abproxy.proxy import variants
from abproxy.proxy.auth import Authorizer
from abproxy.proxy.overrides import LiveOverrides
from abproxy.catalog import Catalog, ExperimentPlan
from abproxy.config import Config
from abproxy.judging.sampler import JudgeSampler
from abproxy.wire import (
    BodyReader,
    ClientGone,
    Headers,
    HTTPError,
    RequestIds,
    declared_length,
    dump_json_object,
    header,
    parse_json_object,
    read_body,
    refuse_dot_segments,
    send_error,
)
from abproxy.recording import ids, layout
from abproxy.recording.outcome import ExperimentRoute, Judging, Outcome
from abproxy.recording.recorder import Recorder
from abproxy.proxy.disconnect import DisconnectWatch
from abproxy.proxy.sse import StreamObserver
from abproxy.upstream.client import StreamedBody
from abproxy.upstream.http11 import UpstreamResponse
from abproxy.upstream.policy import (
    UPSTREAM_FAILURES,
    Upstreams,
    check_generation_answer,
    check_generation_body,
    error_reason,
    response_headers,
    translate_failure,
)

_APPLY = {
    "chat": variants.apply_to_chat,
    "responses": variants.apply_to_responses,
    "completions": variants.apply_to_completions,
}

SHUTTING_DOWN = HTTPError(503, "the proxy is shutting down; retry", "server_shutting_down", "server_error")


@dataclass(slots=True)
class _Call:
    """One generation call, ready to go upstream."""

    outcome: Outcome
    started: float
    path: str
    body: bytes
    streaming: bool
    strip_usage: bool
    extra_headers: Headers


GENERATION_PATHS = {"chat": "/chat/completions", "completions": "/completions", "responses": "/responses"}
"""Each generation endpoint's path below ``/v1``, on abproxy and on the upstream alike."""


def upstream_path(scope: Scope) -> str:
    """The path after ``/v1`` (and after the prefix abproxy is mounted under), still
    percent-encoded as the client sent it, so that nothing it encoded (``%2F``, ``%3F``) changes
    meaning; dot segments could climb out of the upstream's base path with the proxy's key, so
    they are refused."""
    path = get_route_path(scope)
    refuse_dot_segments(path)
    raw = scope.get("raw_path")
    if raw:
        sent = raw.decode("latin-1").split("?", 1)[0]
        root = scope.get("root_path", "")
        if root and sent.startswith(root):
            sent = sent[len(root) :]
        if sent.startswith("/v1/"):
            return sent[len("/v1") :]
    return quote(path[len("/v1") :])


def _unit_from_body(body: dict[str, Any]) -> str | None:
    user = body.get("user")
    if user is None or isinstance(user, str):
        return user
    raise HTTPError(400, f"'user' must be a string, not {type(user).__name__}", "invalid_user", param="user")


class Proxy:
    def __init__(
        self,
        config: Config,
        catalog: Catalog,
        upstreams: Upstreams,
        recorder: Recorder,
        authorizer: Authorizer,
        overrides: LiveOverrides | None = None,
        clock: Callable[[], float] = time.perf_counter,
        signers: ids.Signers | None = None,
        judges: JudgeSampler | None = None,
        draw: Draw = random_draw,
    ):
        """``signers`` signs experiment requests' ids once its secret is loaded; ``judges``
        chooses the requests LLM judges score; ``draw`` makes the request's random choices."""
        self._config = config
        self._catalog = catalog
        self._upstreams = upstreams
        self._recorder = recorder
        self._authorize = authorizer.client
        self._overrides = overrides or LiveOverrides(())
        self._clock = clock
        self._max_body = config.server.max_body_bytes
        self._trace_rate = config.mlflow.trace_sample_rate
        self._ids = RequestIds()
        self._signers = signers or ids.Signers()
        self._judges = judges
        self._draw = draw
        self.in_flight = 0
        """Requests forwarded and not yet handed to the recorder (shutdown waits for them)."""

    async def drained(self, timeout_s: float) -> bool:
        """Wait until every forwarded request was handed to the recorder: after uvicorn cancels
        what outlived the grace period, each cut request still records itself."""
        deadline = time.monotonic() + timeout_s
        while self.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return not self.in_flight

    def _plan_for(self, scope: Scope, body: dict[str, Any]) -> ExperimentPlan | None:
        named = header(scope, b"x-abproxy-experiment")
        if named:
            plan = self._catalog.plans.get(named)
            if plan is None:
                raise HTTPError(404, f"unknown experiment {named!r}", "experiment_not_found")
            return plan
        return self._catalog.by_model(body.get("model"))

    def _route(self, scope: Scope, unit_in_body: str | None, plan: ExperimentPlan, received: bytes) -> ExperimentRoute:
        forced = header(scope, b"x-abproxy-variant")
        user = header(scope, b"x-abproxy-user") or unit_in_body or None
        unit = user if plan.settings.unit == "user" else None
        if forced:
            if forced not in plan.arms:
                raise HTTPError(400, f"experiment {plan.name!r} has no variant {forced!r}", "variant_not_found")
            variant = forced
        elif (promoted := self._overrides.promoted(plan.name)) in plan.arms:
            # The test is over: everyone gets the promoted variant, counted in Prometheus only.
            return ExperimentRoute(plan.name, promoted, plan.arms[promoted].arm_id, unit, True)
        elif unit is not None:
            variant = plan.allocation.choose(unit)
        else:
            # A unit of one request: its random id's hash would be just another random draw.
            variant = plan.allocation.choose_at(self._draw("variant", received))
        arm = plan.arms[variant].arm_id
        if not forced and arm in self._overrides.stopped(plan.name):
            # Stopped for harm: the control serves its units, counted in Prometheus only.
            control = plan.settings.control_name
            return ExperimentRoute(plan.name, control, plan.arms[control].arm_id, unit, True, user)
        return ExperimentRoute(plan.name, variant, arm, unit, bool(forced), user)

    def _sign(self, route: ExperimentRoute, traced: bool) -> tuple[str, ids.SignedId] | None:
        """A signed id carrying the request (None before the secret is loaded, or for names too
        long to fit an id): the request then needs no record in Redis until feedback arrives."""
        signer = self._signers.signer
        if signer is None:
            return None
        user = route.unit if route.unit is not None else route.user
        unit = layout.hash_unit(user) if user is not None else None
        signed = signer.issue(route.experiment, route.arm, unit, route.forced, traced, ids.MAX_ID_LENGTH)
        return (signer.encode(signed), signed) if signed is not None else None

    # -- generation endpoints ---------------------------------------------------------------

    async def generation(self, endpoint: str, scope: Scope, receive: Any, send: Any) -> None:
        started = self._clock()
        request_id = self._ids.next()
        id_header = (b"x-abproxy-request-id", request_id.encode())
        try:
            self._authorize(scope)
            raw = received = await read_body(scope, receive, self._max_body)
            body = parse_json_object(raw)
            unit_in_body = _unit_from_body(body)
            plan = self._plan_for(scope, body)
            route = None
            signed: tuple[str, ids.SignedId] | None = None
            traced = False
            judging = None
            upstream = self._config.default_upstream
            strip_usage = False
            extra_headers: Headers = [id_header]
            if plan is not None:
                route = self._route(scope, unit_in_body, plan, received)
                if self._judges is not None and plan.settings.judges and not route.forced:
                    chosen = self._judges.choose(plan, received)
                    if chosen:  # the judges see the client's input: read before the variant changes it
                        judging = Judging(chosen, variants.input_text(endpoint, body))
                arm = plan.arms[route.variant]
                upstream = arm.upstream
                try:
                    _APPLY[endpoint](body, arm.definition, variants.pop_variables(body))
                except variants.TemplateError as error:
                    raise HTTPError(400, str(error), "template_error") from None
                strip_usage = self._ask_for_stream_usage(endpoint, body)
                raw = dump_json_object(body)
                # Signed last: an id that carries the request is given only to one that goes upstream.
                traced = bool(self._trace_rate) and (judging is not None or self._draw("trace", received) < self._trace_rate)
                signed = self._sign(route, traced)
                if signed is not None:
                    request_id = signed[0]
                    id_header = (b"x-abproxy-request-id", request_id.encode())
                extra_headers = [
                    id_header,
                    (b"x-abproxy-experiment", plan.name.encode()),
                    (b"x-abproxy-variant", route.variant.encode()),
                ]
        except HTTPError as error:
            await send_error(send, error, [id_header])
            return
        except ClientGone:
            return
        outcome = Outcome(
            request_id=request_id,
            endpoint=endpoint,
            upstream=upstream,
            model=model if isinstance(model := body.get("model"), str) else "",
            started_at=time.time(),
            route=route,
        )
        if signed is not None:
            outcome.signed = signed[1]
        outcome.judging = judging
        if traced:
            # chosen now: feedback may name it before it is written
            outcome.trace_id = signed[1].trace_id if signed is not None else f"tr-{self._ids.next()}"
            outcome.sent_body = raw
        call = _Call(outcome, started, GENERATION_PATHS[endpoint], raw, body.get("stream") is True, strip_usage, extra_headers)
        self.in_flight += 1
        try:
            await self._forward(call, scope, receive, send)
        finally:
            self.in_flight -= 1
            self._recorder.record(outcome)

    @staticmethod
    def _ask_for_stream_usage(endpoint: str, body: dict[str, Any]) -> bool:
        """Ask a streaming upstream for usage; True when the client did not ask for it itself."""
        if endpoint == "responses" or body.get("stream") is not True:
            return False
        options = body.get("stream_options")
        if isinstance(options, dict) and options.get("include_usage") is True:
            return False
        body["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
        return True

    async def _forward(self, call: _Call, scope: Scope, receive: Any, send: Any) -> None:
        outcome = call.outcome
        upstream = outcome.upstream
        watch = DisconnectWatch(receive, active=call.streaming)
        response_started = False
        try:
            async with self._upstreams.post_json(
                upstream, call.path, scope.get("query_string", b""), scope["headers"], call.body, call.streaming
            ) as response:
                status = response.status
                check_generation_answer(status, response.content_type, call.streaming)
                headers = response_headers(response.raw_headers) + call.extra_headers
                outcome.status = status
                is_stream = response.content_type == "text/event-stream" and status < 400
                if status >= 400:
                    outcome.error_reason = error_reason(status)
                if not is_stream:
                    data = await response.read()
                    check_generation_body(status, data)
                    watch.stop()
                    outcome.body = data
                    headers.append((b"content-length", str(len(data)).encode()))
                    await send({"type": "http.response.start", "status": status, "headers": headers})
                    response_started = True
                    await send({"type": "http.response.body", "body": data})
                else:
                    await send({"type": "http.response.start", "status": status, "headers": headers})
                    response_started = True
                    await self._relay_stream(call, response, send, watch)
        except asyncio.CancelledError:
            watch.stop()
            current = asyncio.current_task()
            if current is not None:
                current.uncancel()
            outcome.cancel()
            if not watch.gone:
                # Cut at shutdown, after the grace period: the client learns it, and nothing
                # of the task's end reaches the log as a traceback.
                await _tell_client(send, SHUTTING_DOWN, response_started, call.extra_headers)
        except UPSTREAM_FAILURES as error:
            watch.stop()
            http_error, outcome.error_reason = translate_failure(error, upstream)
            if not response_started:
                outcome.status = http_error.status
            else:
                outcome.error_reason = _mid_answer(outcome.error_reason)
                http_error = HTTPError(
                    502, f"upstream stream interrupted: {http_error.message}", http_error.code, "upstream_error"
                )
            self._upstreams.failed(upstream, outcome.error_reason, error)
            await _tell_client(send, http_error, response_started, call.extra_headers)
        finally:
            watch.stop()
            outcome.latency_s = self._clock() - call.started

    async def _relay_stream(self, call: _Call, response: UpstreamResponse, send: Any, watch: DisconnectWatch) -> None:
        outcome = call.outcome
        outcome.streamed = True
        observer = StreamObserver(outcome.endpoint, call.strip_usage, self._clock)
        try:
            async for chunk in response:
                forward = observer.feed(chunk)
                if forward:
                    await send({"type": "http.response.body", "body": forward, "more_body": True})
        finally:
            outcome.stream_payloads = observer.payloads
            if observer.first_content_at is not None:
                outcome.ttft_s = observer.first_content_at - call.started
        watch.stop()
        if observer.ended_well:
            await send({"type": "http.response.body", "body": observer.remainder()})
            return
        # Closed without its end marker, or with an error event: not a success to count, and
        # the client must not take the cut-off text for a whole answer either. An incomplete
        # last event is dropped: the SDK would read it together with the error event.
        outcome.error_reason = "broken_stream"
        end = b"" if observer.failed else _STREAM_ENDED_EARLY.sse_event()
        await send({"type": "http.response.body", "body": end})

    # -- everything else under /v1 ----------------------------------------------------------

    async def passthrough(self, scope: Scope, receive: Any, send: Any) -> None:
        """Any other ``/v1/*`` call, forwarded unchanged to ``default_upstream``, streamed both
        ways. Counted in Prometheus (``experiment=""``), not recorded in Redis."""
        started = self._clock()
        request_id = self._ids.next()
        id_header = (b"x-abproxy-request-id", request_id.encode())
        upstream = self._config.default_upstream
        try:
            self._authorize(scope)
            path = upstream_path(scope)
            body = await self._request_body(scope, receive)
        except HTTPError as error:
            await send_error(send, error, [id_header])
            return
        except ClientGone:
            return
        outcome = Outcome(request_id, "passthrough", upstream, "", time.time(), streamed=True)
        self.in_flight += 1
        try:
            await self._relay(outcome, scope, send, path, body, [id_header])
        finally:
            self.in_flight -= 1
            outcome.latency_s = self._clock() - started
            self._recorder.record(outcome)

    async def _relay(
        self, outcome: Outcome, scope: Scope, send: Any, path: str, body: bytes | StreamedBody | None, own: Headers
    ) -> None:
        upstream = outcome.upstream
        response_started = False
        try:
            async with self._upstreams.forward(
                upstream, scope["method"], path, scope.get("query_string", b""), scope["headers"], body
            ) as response:
                outcome.status = response.status
                if response.status >= 400:
                    outcome.error_reason = error_reason(response.status)
                headers = response_headers(response.raw_headers) + own
                await send({"type": "http.response.start", "status": response.status, "headers": headers})
                response_started = True
                async for chunk in response:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await send({"type": "http.response.body", "body": b""})
        except HTTPError as error:  # the client's body, while it was being forwarded
            outcome.status = error.status
            await send_error(send, error, own)
        except ClientGone:
            outcome.cancel()
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None:
                current.uncancel()
            outcome.cancel()
            if not response_started:
                await _tell_client(send, SHUTTING_DOWN, False, own)
        except UPSTREAM_FAILURES as error:
            http_error, reason = translate_failure(error, upstream)
            outcome.error_reason = reason
            self._upstreams.failed(upstream, _mid_answer(reason) if response_started else reason, error)
            if not response_started:
                outcome.status = http_error.status
                await send_error(send, http_error, own)
            else:
                await send({"type": "http.response.body", "body": b""})  # all that is left: end the body early

    async def _request_body(self, scope: Scope, receive: Any) -> bytes | StreamedBody | None:
        """The client's body as it will be forwarded: none, whole (when it came in one piece),
        or streamed on as it arrives, never more than ``max_body_bytes``."""
        length = declared_length(scope, self._max_body)
        if length is None and header(scope, b"transfer-encoding") is None:
            return None
        reader = BodyReader(receive, self._max_body)
        first = await reader.chunk()
        if reader.done:
            return first
        return StreamedBody(reader.rest(first), length)


def _mid_answer(reason: str) -> str:
    """The reason for a failure after the answer began: broken off, unless it was too slow or
    too large."""
    return reason if reason in ("timeout", "too_large") else "broken_stream"


_STREAM_ENDED_EARLY = HTTPError(
    502, "upstream stream ended before its end marker; the answer is incomplete", "broken_stream", "upstream_error"
)


async def _tell_client(send: Any, error: HTTPError, response_started: bool, headers: Headers) -> None:
    """An error for the client: as the response when nothing was sent yet, else as the stream's
    last event. Bounded in time: a client that stopped reading must not hold the proxy."""
    try:
        async with asyncio.timeout(1.0):
            if response_started:
                await send({"type": "http.response.body", "body": error.sse_event()})
            else:
                await send_error(send, error, headers)
    except (TimeoutError, OSError):
        pass
