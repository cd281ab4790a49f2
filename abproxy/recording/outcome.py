"""What happened to one proxied request: captured on the request path as cheaply as possible,
interpreted later by the recorder, off the request path."""

from __future__ import annotations

from dataclasses import dataclass, field

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

    def cancel(self) -> None:
        self.cancelled = True
        self.status = CANCELLED_STATUS

    @property
    def failed(self) -> bool:
        return not self.cancelled and (self.status >= 400 or self.error_reason is not None)
