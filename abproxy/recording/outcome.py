"""What happened to one proxied request: captured on the request path as cheaply as possible,
interpreted later by the recorder, off the request path."""

from __future__ import annotations

from dataclasses import dataclass, field

from abproxy.recording.ids import SignedId
from abproxy.recording.record import RequestRecord

MAX_JUDGED_CHARS = 32_000
"""What a judge sees of the input and of the answer, each: a judge call's cost stays bounded
whatever the client sent, and so does what a queued judge job holds."""

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


@dataclass(frozen=True, slots=True)
class Judging:
    """The judges a request was sampled for, and what they will see of the client's request."""

    judges: tuple[str, ...]
    input: str
    """The client's last user message, before the variant applied."""


@dataclass(frozen=True, slots=True)
class JudgeJob:
    """A successful answer to be judged, as the recorder hands it to the judges."""

    feedback_id: str
    """The request's feedback hash in Redis: a judge's score is kept there like a user's."""
    record: RequestRecord
    judges: tuple[str, ...]
    input: str
    output: str


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
    judging: Judging | None = None
    """Set when LLM judges are to score this request's answer."""

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
    """The request as sent upstream, the variant applied (past ``trim.TRACED_BYTES``, cut)."""
    answer: str | None
    """The generated text (a stream's, assembled; cut the same way)."""
    response_body: bytes | None
    """A JSON response as the upstream sent it (cut the same way); None for a stream."""
    prompt_tokens: int | None
    completion_tokens: int | None
    total_tokens: int | None
    judged: bool = False
    """Traced because a judge scores it: written whatever the trace cap (the judges' caps bound it)."""
    cut: tuple[str, ...] = ()
    """Which of ``inputs`` and ``outputs`` were cut to ``trim.TRACED_BYTES``."""

    @property
    def size(self) -> int:
        """Roughly the memory it holds while queued."""
        return len(self.sent_body) + len(self.answer or "") + len(self.response_body or b"")
