"""The request path: join an experiment, assign and apply a variant, forward, stream back,
and hand a raw :class:`Outcome` to the recorder. Nothing here waits on Redis or computes
statistics; response bodies are interpreted later, off this path."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import orjson
from yarl import URL

from abproxy import variants
from abproxy.auth import Authorizer
from abproxy.catalog import Catalog, ExperimentPlan
from abproxy.config import Config
from abproxy.http import (
    JSON_CONTENT_TYPE,
    ClientGone,
    Headers,
    HTTPError,
    RequestIds,
    dump_json_object,
    error_body,
    header,
    parse_json_object,
    read_body,
    send_error,
)
from abproxy.outcome import CANCELLED_STATUS, ExperimentRoute, Outcome
from abproxy.recorder import Recorder
from abproxy.sse import StreamObserver
from abproxy.upstream import Upstreams, error_reason, response_headers, translate_failure
from abproxy.upstream_http import UpstreamResponse

log = logging.getLogger("abproxy.proxy")

_APPLY = {
    "chat": variants.apply_to_chat,
    "responses": variants.apply_to_responses,
    "completions": variants.apply_to_completions,
}


class _DisconnectWatch:
    """Cancels the request's task when the client goes away, so the upstream call stops too.

    Watching costs a task per request, so only streams are watched: they are the long calls.
    Must be stopped before the final ``send``: after it the server reports a disconnect."""

    def __init__(self, receive: Any, active: bool):
        self.gone = False
        self._target = asyncio.current_task() if active else None
        self._task = asyncio.ensure_future(self._watch(receive)) if active else None

    async def _watch(self, receive: Any) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self.gone = True
        if self._target is not None:
            self._target.cancel()

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None


def upstream_path(scope: dict[str, Any]) -> str:
    """The path after ``/v1``, still percent-encoded as the client sent it, so that nothing it
    encoded (``%2F``, ``%3F``) changes meaning; dot segments could climb out of the upstream's
    base path with the proxy's key, so they are refused."""
    decoded_segments = scope["path"].split("/")
    if "." in decoded_segments or ".." in decoded_segments:
        raise HTTPError(400, "path segments '.' and '..' are not allowed", "invalid_path")
    raw = scope.get("raw_path") or scope["path"].encode()
    return raw.decode("latin-1").split("?", 1)[0][len("/v1") :]


class Proxy:
    def __init__(
        self,
        config: Config,
        catalog: Catalog,
        upstreams: Upstreams,
        recorder: Recorder,
        authorizer: Authorizer,
        clock: Callable[[], float] = time.perf_counter,
    ):
        self._config = config
        self._catalog = catalog
        self._upstreams = upstreams
        self._recorder = recorder
        self._authorize = authorizer.client
        self._clock = clock
        self._max_body = config.server.max_body_bytes
        self._ids = RequestIds()
        self._random = random.random

    def _plan_for(self, scope: dict[str, Any], body: dict[str, Any]) -> ExperimentPlan | None:
        named = header(scope, b"x-abproxy-experiment")
        if named:
            plan = self._catalog.plans.get(named)
            if plan is None:
                raise HTTPError(404, f"unknown experiment {named!r}", "experiment_not_found")
            return plan
        return self._catalog.by_model(body.get("model"))

    def _route(self, scope: dict[str, Any], body: dict[str, Any], plan: ExperimentPlan) -> ExperimentRoute:
        forced = header(scope, b"x-abproxy-variant")
        unit: str | None = None
        if plan.settings.unit == "user":
            unit = header(scope, b"x-abproxy-user") or (body.get("user") if isinstance(body.get("user"), str) else None)
            unit = unit or None
        if forced:
            if forced not in plan.arms:
                raise HTTPError(
                    400, f"experiment {plan.name!r} has no variant {forced!r}", "variant_not_found"
                )
            variant = forced
        elif unit is not None:
            variant = plan.allocation.choose(unit)
        else:
            # A unit of one request: its random id's hash would be just another random draw.
            variant = plan.allocation.choose_at(self._random())
        return ExperimentRoute(plan.name, variant, plan.arms[variant].arm_id, unit, bool(forced))

    # -- generation endpoints ---------------------------------------------------------------

    async def generation(self, endpoint: str, scope: dict[str, Any], receive: Any, send: Any) -> None:
        started = self._clock()
        request_id = self._ids.next()
        id_header = (b"x-abproxy-request-id", request_id.encode())
        try:
            self._authorize(scope)
            raw = await read_body(scope, receive, self._max_body)
            body = parse_json_object(raw)
            plan = self._plan_for(scope, body)
            route = None
            upstream = self._config.default_upstream
            strip_usage = False
            extra_headers: Headers = [id_header]
            if plan is not None:
                route = self._route(scope, body, plan)
                arm = plan.arms[route.variant]
                upstream = arm.upstream
                try:
                    _APPLY[endpoint](body, arm.definition, variants.pop_variables(body))
                except variants.TemplateError as error:
                    raise HTTPError(400, str(error), "template_error") from None
                strip_usage = self._ask_for_stream_usage(endpoint, body)
                raw = dump_json_object(body)
                extra_headers += [
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
            model=body.get("model") if isinstance(body.get("model"), str) else "",
            started_at=time.time(),
            route=route,
        )
        await self._forward(
            outcome,
            started,
            scope,
            receive,
            send,
            raw,
            extra_headers,
            endpoint,
            strip_usage,
            f"/{scope['path'][4:]}",
            streaming=body.get("stream") is True,
        )
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

    async def _forward(
        self,
        outcome: Outcome,
        started: float,
        scope: dict[str, Any],
        receive: Any,
        send: Any,
        body: bytes,
        extra_headers: Headers,
        endpoint: str,
        strip_usage: bool,
        path: str,
        streaming: bool,
    ) -> None:
        upstream = outcome.upstream
        watch = _DisconnectWatch(receive, active=streaming)
        response_started = False
        try:
            async with self._upstreams.post_json(
                upstream, path, scope.get("query_string", b""), scope["headers"], body, streaming
            ) as response:
                status = response.status
                headers = response_headers(response.raw_headers) + extra_headers
                outcome.status = status
                is_stream = response.content_type == "text/event-stream" and status < 400
                if status >= 400:
                    outcome.error_reason = error_reason(status)
                if not is_stream:
                    data = await response.read()
                    watch.stop()
                    outcome.body = data
                    headers.append((b"content-length", str(len(data)).encode()))
                    await send({"type": "http.response.start", "status": status, "headers": headers})
                    response_started = True
                    await send({"type": "http.response.body", "body": data})
                else:
                    await send({"type": "http.response.start", "status": status, "headers": headers})
                    response_started = True
                    await self._relay_stream(outcome, started, response, send, endpoint, strip_usage, watch)
        except asyncio.CancelledError:
            if not watch.gone:
                raise
            current = asyncio.current_task()
            if current is not None:
                current.uncancel()
            outcome.status = CANCELLED_STATUS
        except (TimeoutError, aiohttp.ClientError, OSError) as error:
            watch.stop()
            http_error, reason = translate_failure(error, upstream)
            outcome.error_reason = reason
            if not response_started:
                outcome.status = http_error.status
                await send_error(send, http_error, extra_headers)
            else:
                # Headers are gone already: end the stream with an error event the SDK raises on.
                outcome.error_reason = "timeout" if reason == "timeout" else "broken_stream"
                event = b"data: " + error_body(f"upstream stream interrupted: {http_error.message}", "upstream_error", "broken_stream") + b"\n\n"
                await send({"type": "http.response.body", "body": event})
        finally:
            watch.stop()
        outcome.latency_s = self._clock() - started

    async def _relay_stream(
        self,
        outcome: Outcome,
        started: float,
        response: UpstreamResponse,
        send: Any,
        endpoint: str,
        strip_usage: bool,
        watch: _DisconnectWatch,
    ) -> None:
        outcome.streamed = True
        observer = StreamObserver(endpoint, strip_usage, self._clock)
        try:
            async for chunk in response:
                forward = observer.feed(chunk)
                if forward:
                    await send({"type": "http.response.body", "body": forward, "more_body": True})
        finally:
            outcome.stream_payloads = observer.payloads
            if observer.first_content_at is not None:
                outcome.ttft_s = observer.first_content_at - started
        if not observer.ended_well:
            # Closed without its end marker, or with an error event: not a success to count.
            outcome.error_reason = "broken_stream"
        watch.stop()
        await send({"type": "http.response.body", "body": observer.remainder()})

    # -- everything else under /v1 ----------------------------------------------------------

    async def passthrough(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """Any other ``/v1/*`` call, forwarded unchanged to ``default_upstream``, streamed back.
        Counted in Prometheus (``experiment=""``), not recorded in Redis."""
        started = self._clock()
        request_id = self._ids.next()
        id_header = (b"x-abproxy-request-id", request_id.encode())
        upstream = self._config.default_upstream
        try:
            self._authorize(scope)
            path = upstream_path(scope)
            body = await read_body(scope, receive, self._max_body)
        except HTTPError as error:
            await send_error(send, error, [id_header])
            return
        except ClientGone:
            return
        outcome = Outcome(request_id, "passthrough", upstream, "", time.time(), streamed=True)
        try:
            async with self._upstreams.session.request(
                scope["method"],
                URL(self._upstreams.url(upstream, path, scope.get("query_string", b"")), encoded=True),
                data=body or None,
                headers=self._upstreams.request_headers(upstream, scope["headers"]),
                timeout=self._upstreams.timeout(upstream, streaming=True),
            ) as response:
                outcome.status = response.status
                if response.status >= 400:
                    outcome.error_reason = error_reason(response.status)
                headers = response_headers(response.raw_headers) + [id_header]
                await send({"type": "http.response.start", "status": response.status, "headers": headers})
                try:
                    async for chunk in response.content.iter_any():
                        await send({"type": "http.response.body", "body": chunk, "more_body": True})
                except (TimeoutError, aiohttp.ClientError, OSError) as error:
                    # Headers are sent: all that is left is to end the body early.
                    outcome.error_reason = translate_failure(error, upstream)[1]
                    log.warning("upstream %s broke off %s %s: %s", upstream, scope["method"], path, type(error).__name__)
                await send({"type": "http.response.body", "body": b""})
        except (TimeoutError, aiohttp.ClientError, OSError) as error:
            http_error, outcome.error_reason = translate_failure(error, upstream)
            outcome.status = http_error.status
            await send_error(send, http_error, [id_header])
        outcome.latency_s = self._clock() - started
        self._recorder.record(outcome)

    async def models(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """The upstream's model list plus one entry per experiment name."""
        id_header = (b"x-abproxy-request-id", self._ids.next().encode())
        upstream = self._config.default_upstream
        try:
            self._authorize(scope)
            async with self._upstreams.session.get(
                self._upstreams.url(upstream, "/models"),
                headers=self._upstreams.request_headers(upstream, scope["headers"]),
                timeout=self._upstreams.timeout(upstream),
            ) as response:
                data = await response.read()
                status = response.status
        except HTTPError as error:
            await send_error(send, error, [id_header])
            return
        except (TimeoutError, aiohttp.ClientError, OSError) as error:
            await send_error(send, translate_failure(error, upstream)[0], [id_header])
            return
        if status < 400:
            try:
                listing = orjson.loads(data)
                models = listing.get("data")
            except (orjson.JSONDecodeError, AttributeError):
                models = None
            if isinstance(models, list):
                known = {m.get("id") for m in models if isinstance(m, dict)}
                created = int(time.time())
                for name in self._catalog.plans:
                    if name not in known:
                        models.append({"id": name, "object": "model", "created": created, "owned_by": "abproxy"})
                data = orjson.dumps(listing)
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [JSON_CONTENT_TYPE, id_header, (b"content-length", str(len(data)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": data})
