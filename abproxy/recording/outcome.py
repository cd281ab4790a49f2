"""What happened to one proxied request: captured on the request path as cheaply as possible,
interpreted later by the recorder, off the request path."""

from __future__ import annotations

from dataclasses import dataclass, field

from abproxy.recording.ids import SignedId

CANCELLED_STATUS = 499
"""The status counted in Prometheus when the client went away first, or the request was cut
at shutdown (nginx's "client closed request"). An upstream's own 499 is not a cancellation."""


@dataclass(slots=True)
class ExperimentRoute:
    """Where an experiment request went: resolved on the request path."""

    experiment: str
    variant: str
    arm: str
    unit: str | None
    """The unit of randomisation: the user for ``unit: user``, else None (each request its own)."""
    forced: bool
    user: str | None = None
    """The request's user whatever the unit: per-user sums of a ``unit: request`` experiment's
    primary metric measure how correlated a user's requests are (its design effect)."""


@dataclass(slots=True)
class Outcome:
    request_id: str
    endpoint: str
    upstream: str
    model: str
    started_at: float
    route: ExperimentRoute | None = None
    status: int = 0
    cancelled: bool = False
    """The client went away, or shutdown cut the request: neither a success nor an error."""
    error_reason: str | None = None
    latency_s: float = 0.0
    ttft_s: float | None = None
    streamed: bool = False
    body: bytes | None = None
    stream_payloads: list[bytes] = field(default_factory=list)
    """A stream's events' data, interpreted by the recorder."""
    trace_id: str | None = None
    """Set when this request was sampled to become an MLflow trace."""
    sent_body: bytes | None = None
    """The body as sent upstream, kept only for a traced request."""
    signed: SignedId | None = None
    """What ``request_id`` carries when it is a signed id: the request then needs no record."""

    def cancel(self) -> None:
        self.cancelled = True
        self.status = CANCELLED_STATUS

    @property
    def failed(self) -> bool:
        return not self.cancelled and (self.status >= 400 or self.error_reason is not None)


@dataclass(frozen=True, slots=True)
class TracedExchange:
    """A sampled request and its answer, as the recorder hands it on to become an MLflow trace."""

    trace_id: str
    request_id: str
    experiment: str
    variant: str
    arm: str
    unit: str | None
    forced: bool
    endpoint: str
    started_at: float
    """Wall-clock seconds since the epoch."""
    latency_s: float
    status: int
    failed: bool
    error_reason: str | None
    sent_body: bytes
    """The request as sent upstream, the variant applied."""
    answer: str | None
    """The generated text (a stream's, assembled)."""
    response_body: bytes | None
    """A JSON response as the upstream sent it; None for a stream."""
    prompt_tokens: int | None
    completion_tokens: int | None
    total_tokens: int | None
