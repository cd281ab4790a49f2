"""A batch of outcomes reduced per arm, called in process: the counts, sums, sums of squares,
histogram buckets and per-user sums handed to the Redis batch script, checked against a brute
force computation over the same requests."""

from __future__ import annotations

import collections
import json
import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from abproxy.config import BUILTIN_METRICS
from abproxy.recording import layout
from abproxy.recording.aggregate import ArmBatch, metric_row
from abproxy.recording.interpret import ResponseFacts, response_facts
from abproxy.recording.outcome import ExperimentRoute, Outcome
from abproxy.stats.histogram import bucket_of

EXPERIMENT = "translation"
VARIANT = "professional"
ARM = "professional@0123456789ab"
META = '{"variant": "professional"}'
PRICES = {"gpt-4o-mini": (0.15, 0.60)}
"""USD per million input and output tokens, as in a config's ``prices``."""
PRICED, UNPRICED = "gpt-4o-mini", "some-local-model"

ANSWERED = ("answer", "stream")
"""Successes whose text and usage the upstream gave."""
SUCCEEDED = (*ANSWERED, "unreadable")
FAILED = ("http_error", "upstream_499", "timeout", "broken_stream")
CANCELLED = ("cancelled", "cancelled_mid_stream")
KINDS = SUCCEEDED + FAILED + CANCELLED


@dataclass(frozen=True)
class Request:
    """One request to the arm, described plainly: what the test expects is worked out from this."""

    kind: str
    user: str | None = None
    latency_s: float = 0.8
    ttft_share: float = 0.25
    """TTFT as a share of the latency, for streams."""
    words: tuple[str, ...] = ("hola", "mundo")
    prompt: int | None = 12
    completion: int | None = 3
    reported_total: int | None = None
    """``usage.total_tokens`` when the upstream reports one."""
    model: str = PRICED

    @property
    def text(self) -> str:
        return " ".join(self.words)

    @property
    def ttft_s(self) -> float:
        return self.latency_s * self.ttft_share


def usage_of(request: Request) -> dict[str, int]:
    usage = {}
    if request.prompt is not None:
        usage["prompt_tokens"] = request.prompt
    if request.completion is not None:
        usage["completion_tokens"] = request.completion
    if request.reported_total is not None:
        usage["total_tokens"] = request.reported_total
    return usage


def stream_events(request: Request, number: int, *, finished: bool = True) -> list[bytes]:
    """A chat stream's events' data, as the proxy's stream observer keeps them."""
    events = [
        json.dumps(
            {
                "id": f"chatcmpl-{number}",
                "choices": [{"index": 0, "delta": {"content": word if i == 0 else " " + word}}],
            }
        )
        for i, word in enumerate(request.words)
    ]
    if finished:
        events.append(json.dumps({"id": f"chatcmpl-{number}", "choices": [], "usage": usage_of(request)}))
    return [event.encode() for event in events]


def outcome_of(request: Request, number: int, *, per_user: bool) -> Outcome:
    """The outcome the proxy's request path leaves for the recorder."""
    route = ExperimentRoute(EXPERIMENT, VARIANT, ARM, request.user if per_user else None, False, request.user)
    outcome = Outcome(f"req-{number}", "chat", "fake", request.model, 1_700_000_000.0 + number, route=route)
    kind = request.kind
    if kind == "answer":
        outcome.status = 200
        message = {"role": "assistant", "content": request.text}
        outcome.body = json.dumps(
            {"id": f"chatcmpl-{number}", "choices": [{"index": 0, "message": message}], "usage": usage_of(request)}
        ).encode()
    elif kind in ("stream", "broken_stream", "cancelled_mid_stream"):
        outcome.status = 200
        outcome.streamed = True
        outcome.stream_payloads = stream_events(request, number, finished=kind == "stream")
        outcome.ttft_s = request.ttft_s
        if kind == "broken_stream":
            outcome.error_reason = "broken_stream"
        elif kind == "cancelled_mid_stream":
            outcome.cancel()
    elif kind == "unreadable":
        outcome.status = 200
        outcome.body = b"<html>an answer that is not JSON</html>"
    elif kind == "http_error":
        outcome.status = 503
        outcome.error_reason = "http_5xx"
        outcome.body = b'{"error": {"message": "overloaded"}}'
    elif kind == "upstream_499":  # the upstream's own 499: not the client going away
        outcome.status = 499
        outcome.error_reason = "http_4xx"
    elif kind == "timeout":
        outcome.status = 504
        outcome.error_reason = "timeout"
    elif kind == "cancelled":
        outcome.cancel()
    else:
        raise AssertionError(kind)
    outcome.latency_s = request.latency_s
    return outcome


def cost_of(model: str, facts: ResponseFacts | None) -> float | None:
    if facts is None or facts.prompt_tokens is None or facts.completion_tokens is None or model not in PRICES:
        return None
    price_in, price_out = PRICES[model]
    return (facts.prompt_tokens * price_in + facts.completion_tokens * price_out) / 1_000_000


def recorded_row(outcome: Outcome) -> tuple[float, ...] | None:
    """The row the recorder makes of an outcome."""
    facts = response_facts(outcome) if outcome.status < 400 and not outcome.error_reason else None
    return metric_row(outcome, facts, cost_of(outcome.model, facts))


def fold(requests: list[Request], *, per_user: bool, unit_metrics: tuple[str, ...]) -> dict[str, Any]:
    """The arm's payload for a batch of these requests, built as the recorder builds it."""
    batch = ArmBatch(META, counts_units=per_user, unit_metrics=unit_metrics)
    for number, request in enumerate(requests):
        outcome = outcome_of(request, number, per_user=per_user)
        route = outcome.route
        assert route is not None
        user = route.unit if route.unit is not None else route.user
        batch.add(recorded_row(outcome), layout.hash_unit(user) if user is not None else None)
    return batch.payload(EXPERIMENT, ARM)


# -- brute force ---------------------------------------------------------------------------------


def expected_values(request: Request) -> dict[str, float] | None:
    """SPEC §3 applied by hand: None for a cancelled request, else each metric it has a value of."""
    if request.kind in CANCELLED:
        return None
    if request.kind in FAILED:
        return {"error_rate": 1.0}
    values = {"error_rate": 0.0, "latency_ms": request.latency_s * 1000.0}
    if request.kind == "stream":
        values["ttft_ms"] = request.ttft_s * 1000.0
    if request.kind in ANSWERED:
        values["response_chars"] = float(len(request.text))
        values["response_words"] = float(len(request.words))
        if request.prompt is not None:
            values["prompt_tokens"] = float(request.prompt)
        if request.completion is not None:
            values["completion_tokens"] = float(request.completion)
        if request.reported_total is not None:
            values["total_tokens"] = float(request.reported_total)
        elif request.prompt is not None and request.completion is not None:
            values["total_tokens"] = float(request.prompt + request.completion)
        if request.model in PRICES and request.prompt is not None and request.completion is not None:
            price_in, price_out = PRICES[request.model]
            values["cost_usd"] = (request.prompt * price_in + request.completion * price_out) / 1_000_000
    return values


def close(actual: float, expected: float, scale: float) -> bool:
    return math.isclose(actual, expected, rel_tol=1e-9, abs_tol=1e-9 * max(1.0, scale))


def assert_payload_matches_brute_force(
    requests: list[Request], *, per_user: bool, unit_metrics: tuple[str, ...]
) -> None:
    payload = fold(requests, per_user=per_user, unit_metrics=unit_metrics)
    rows = [(request, expected_values(request)) for request in requests]
    answered = [(request, values) for request, values in rows if values is not None]

    ints = dict(payload["ints"])
    assert ints.pop("requests") == len(requests)
    assert ints.pop("cancelled", 0) == sum(request.kind in CANCELLED for request in requests)
    assert ints.pop("errors", 0) == sum(request.kind in FAILED for request in requests)
    own_units = sum(request.user is None for request in requests) if per_user else len(requests)
    assert ints.pop("units", 0) == own_units

    by_metric: dict[str, list[tuple[str | None, float]]] = {
        metric: [(request.user, values[metric]) for request, values in answered if metric in values]
        for metric in BUILTIN_METRICS
    }
    present = {metric: pairs for metric, pairs in by_metric.items() if pairs}
    assert ints == {f"{metric}|n": len(pairs) for metric, pairs in present.items()}
    assert set(payload["sums"]) == {f"{metric}|s" for metric in present}
    expected_hist: collections.Counter[str] = collections.Counter()
    means: dict[str, float] = {}
    entries = {entry[0]: entry for entry in payload["metrics"]}
    assert set(entries) == set(present)
    for metric, pairs in present.items():
        values = [value for _, value in pairs]
        scale = math.fsum(abs(value) for value in values)
        mean = means[metric] = math.fsum(values) / len(values)
        assert close(float(payload["sums"][f"{metric}|s"]), math.fsum(values), scale), metric
        _, n, center, deviation, squares, alone_n, alone_deviation, alone_squares = entries[metric]
        assert n == len(values)
        assert close(center, mean, scale / len(values)), metric
        assert abs(deviation) <= 1e-9 * max(1.0, scale), metric
        assert close(squares, math.fsum((value - mean) ** 2 for value in values), scale * scale / len(values)), metric
        expected_hist.update(f"{metric}|{bucket_of(value)}" for value in values)
        alone = [value for user, value in pairs if user is None] if metric in unit_metrics else []
        assert alone_n == len(alone), metric
        assert close(alone_deviation, math.fsum(value - mean for value in alone), scale), metric
        assert close(alone_squares, math.fsum((value - mean) ** 2 for value in alone), scale * scale / len(values)), (
            metric
        )
    assert payload["hist"] == dict(expected_hist)

    users = (
        list(dict.fromkeys(request.user for request in requests if request.user is not None)) if unit_metrics else []
    )
    summed = [metric for metric in BUILTIN_METRICS if metric in unit_metrics and metric in present] if users else []
    assert sorted(payload["unit_metrics"]) == sorted(summed)
    units = {key: (dy, dn) for key, dy, dn in payload["units"]}
    assert len(units) == len(payload["units"])  # each user once
    if users and summed:
        assert set(units) == {layout.unit_key(EXPERIMENT, ARM, layout.hash_unit(user)) for user in users}
        for user in users:
            dy, dn = units[layout.unit_key(EXPERIMENT, ARM, layout.hash_unit(user))]
            for column, metric in enumerate(payload["unit_metrics"]):
                mine = [value for owner, value in present[metric] if owner == user]
                scale = math.fsum(abs(value) for _, value in present[metric])
                assert dn[column] == len(mine), (user, metric)
                assert close(dy[column], math.fsum(value - means[metric] for value in mine), scale), (user, metric)
    elif users and per_user:
        assert units == {layout.unit_key(EXPERIMENT, ARM, layout.hash_unit(user)): ([], []) for user in users}
    else:
        assert units == {}


requests_strategy = st.builds(
    Request,
    kind=st.sampled_from(KINDS),
    user=st.sampled_from([None, "ana", "bo", "cy", "dee"]),
    latency_s=st.floats(0.001, 120.0),
    ttft_share=st.floats(0.0, 1.0),
    words=st.lists(st.sampled_from(["hola", "mundo", "é", "ünïcode", "42", "x"]), max_size=6).map(tuple),
    prompt=st.one_of(st.none(), st.integers(0, 5000)),
    completion=st.one_of(st.none(), st.integers(0, 5000)),
    reported_total=st.one_of(st.none(), st.integers(0, 20000)),
    model=st.sampled_from([PRICED, UNPRICED]),
)
BATCH = settings(max_examples=100, deadline=None)


# -- one request's row ---------------------------------------------------------------------------


def row_of(request: Request) -> dict[str, float] | None:
    row = recorded_row(outcome_of(request, 1, per_user=True))
    if row is None:
        return None
    assert len(row) == len(BUILTIN_METRICS)
    return {metric: value for metric, value in zip(BUILTIN_METRICS, row, strict=True) if not math.isnan(value)}


def test_a_streamed_answer_is_measured_for_latency_ttft_length_tokens_and_cost() -> None:
    request = Request(
        "stream",
        latency_s=1.5,
        ttft_share=0.2,
        words=("Buenos", "días,", "señor"),
        prompt=40,
        completion=7,
        reported_total=47,
    )
    price_in, price_out = PRICES[PRICED]
    assert row_of(request) == {
        "error_rate": 0.0,
        "latency_ms": 1500.0,
        "ttft_ms": pytest.approx(300.0),
        "response_chars": len("Buenos días, señor"),
        "response_words": 3,
        "prompt_tokens": 40,
        "completion_tokens": 7,
        "total_tokens": 47,
        "cost_usd": pytest.approx((40 * price_in + 7 * price_out) / 1e6),
    }


def test_a_json_answer_has_no_ttft_and_usage_without_a_total_is_totalled() -> None:
    row = row_of(Request("answer", prompt=30, completion=5, reported_total=None))
    assert row is not None
    assert "ttft_ms" not in row
    assert row["total_tokens"] == 35


def test_an_answer_from_a_model_without_a_price_has_no_cost() -> None:
    row = row_of(Request("answer", model=UNPRICED))
    assert row is not None and "cost_usd" not in row and row["prompt_tokens"] == 12


def test_a_success_with_an_unreadable_body_counts_its_latency_but_no_length_tokens_or_cost() -> None:
    assert row_of(Request("unreadable", latency_s=0.25)) == {"error_rate": 0.0, "latency_ms": 250.0}


@pytest.mark.parametrize("kind", FAILED)
def test_a_failed_request_counts_as_an_error_and_for_nothing_else(kind: str) -> None:
    assert row_of(Request(kind)) == {"error_rate": 1.0}


@pytest.mark.parametrize("kind", CANCELLED)
def test_a_cancelled_request_has_no_metric_values_at_all(kind: str) -> None:
    assert row_of(Request(kind)) is None


# -- a batch of one arm ------------------------------------------------------------------------------


def test_a_batch_counts_every_request_and_rates_errors_over_the_requests_not_cancelled() -> None:
    requests = [Request("answer"), Request("stream"), Request("unreadable"), Request("timeout"), Request("http_error"),
                Request("upstream_499"), Request("cancelled"), Request("cancelled_mid_stream")]  # fmt: skip
    payload = fold(requests, per_user=False, unit_metrics=())
    not_cancelled = [request for request in requests if request.kind not in CANCELLED]
    failed = [request for request in requests if request.kind in FAILED]
    assert payload["ints"]["requests"] == len(requests)
    assert payload["ints"]["cancelled"] == len(requests) - len(not_cancelled)
    assert payload["ints"]["errors"] == len(failed)
    assert payload["ints"]["error_rate|n"] == len(not_cancelled)
    assert float(payload["sums"]["error_rate|s"]) == len(failed)
    assert payload["ints"]["latency_ms|n"] == sum(request.kind in SUCCEEDED for request in requests)


def test_a_batch_without_errors_or_cancellations_sends_no_such_counters() -> None:
    payload = fold([Request("answer"), Request("stream")], per_user=False, unit_metrics=())
    assert "errors" not in payload["ints"] and "cancelled" not in payload["ints"]


def test_a_batch_of_cancellations_alone_counts_requests_and_nothing_measured() -> None:
    payload = fold([Request("cancelled"), Request("cancelled_mid_stream")], per_user=False, unit_metrics=())
    assert payload["ints"] == {"requests": 2, "cancelled": 2, "units": 2}
    assert payload["sums"] == {} and payload["hist"] == {} and payload["metrics"] == []


def test_in_a_user_experiment_each_user_is_one_unit_and_each_request_without_a_user_its_own() -> None:
    requests = [Request("answer", user="ana"), Request("stream", user="ana"), Request("answer", user="bo"),
                Request("answer"), Request("cancelled")]  # fmt: skip
    payload = fold(requests, per_user=True, unit_metrics=BUILTIN_METRICS)
    assert payload["ints"]["units"] == 2  # the two requests without a user; the users are counted by key
    assert [unit[0] for unit in payload["units"]] == [
        layout.unit_key(EXPERIMENT, ARM, layout.hash_unit("ana")), layout.unit_key(EXPERIMENT, ARM, layout.hash_unit("bo")),
    ]  # fmt: skip
    assert "ana" not in json.dumps(payload)  # key names carry the user's hash, never the user id


@pytest.mark.parametrize(
    "requests",
    [
        [Request("cancelled", user="ana")],
        [Request("cancelled", user="ana"), Request("timeout", user="ana")],
        [Request("cancelled_mid_stream", user="ana"), Request("answer", user="bo")],
    ],
    ids=["cancelled-only batch", "failed and cancelled", "beside another user's answer"],
)
def test_a_user_whose_requests_all_failed_or_were_cancelled_is_still_a_unit_of_the_arm(requests: list[Request]) -> None:
    payload = fold(requests, per_user=True, unit_metrics=BUILTIN_METRICS)
    units = {key: dn for key, _, dn in payload["units"]}
    ana = layout.unit_key(EXPERIMENT, ARM, layout.hash_unit("ana"))
    assert ana in units
    latency = payload["unit_metrics"].index("latency_ms") if "latency_ms" in payload["unit_metrics"] else None
    assert latency is None or units[ana][latency] == 0  # a unit, with no latency of its own


def test_in_a_request_experiment_every_request_is_a_unit_and_only_the_primary_metric_is_summed_per_user() -> None:
    requests = [Request("answer", user="ana", latency_s=0.5), Request("answer", user="ana", latency_s=0.7),
                Request("stream", user="bo", latency_s=1.1), Request("answer", latency_s=0.9), Request("cancelled", user="cy")]  # fmt: skip
    payload = fold(requests, per_user=False, unit_metrics=("latency_ms",))
    assert payload["ints"]["units"] == len(requests)
    assert payload["count_units"] is False
    assert payload["unit_metrics"] == ["latency_ms"]
    latencies = [request.latency_s * 1000 for request in requests if request.kind not in CANCELLED]
    mean = math.fsum(latencies) / len(latencies)
    sums = {key: (dy, dn) for key, dy, dn in payload["units"]}
    assert sums[layout.unit_key(EXPERIMENT, ARM, layout.hash_unit("ana"))][1] == [2]
    assert sums[layout.unit_key(EXPERIMENT, ARM, layout.hash_unit("ana"))][0] == [pytest.approx(500 + 700 - 2 * mean)]
    assert sums[layout.unit_key(EXPERIMENT, ARM, layout.hash_unit("bo"))] == ([pytest.approx(1100 - mean)], [1])
    assert sums[layout.unit_key(EXPERIMENT, ARM, layout.hash_unit("cy"))] == ([0.0], [0])
    entry = next(entry for entry in payload["metrics"] if entry[0] == "latency_ms")
    assert entry[5:7] == [1, pytest.approx(900 - mean)]  # the request without a user: a unit of one
    other = next(entry for entry in payload["metrics"] if entry[0] == "response_chars")
    assert other[5:8] == [0, 0.0, 0.0]


def test_in_a_request_experiment_without_a_builtin_primary_metric_no_per_user_sums_are_sent() -> None:
    payload = fold([Request("answer", user="ana"), Request("answer", user="bo")], per_user=False, unit_metrics=())
    assert payload["units"] == [] and payload["unit_metrics"] == []
    assert payload["ints"]["units"] == 2


def test_sums_of_squares_keep_their_digits_for_latencies_near_a_trillion_milliseconds() -> None:
    requests = [Request("answer", latency_s=1e9 + step * 1e-3) for step in (0, 1, 2, 3, 5, 8, 13)]
    payload = fold(requests, per_user=False, unit_metrics=())
    values = [Fraction(request.latency_s * 1000.0) for request in requests]
    mean = sum(values) / len(values)
    exact = float(sum((value - mean) ** 2 for value in values))
    entry = next(entry for entry in payload["metrics"] if entry[0] == "latency_ms")
    assert entry[4] == pytest.approx(exact, rel=1e-6)
    assert exact > 0


@BATCH
@given(requests=st.lists(requests_strategy, max_size=30))
def test_a_user_experiments_batch_adds_what_brute_force_counts(requests: list[Request]) -> None:
    assert_payload_matches_brute_force(requests, per_user=True, unit_metrics=BUILTIN_METRICS)


@BATCH
@given(
    requests=st.lists(requests_strategy, max_size=30),
    primary=st.sampled_from(["latency_ms", "error_rate", "ttft_ms", "cost_usd"]),
)
def test_a_request_experiments_batch_adds_what_brute_force_counts(requests: list[Request], primary: str) -> None:
    assert_payload_matches_brute_force(requests, per_user=False, unit_metrics=(primary,))
