"""The request record: what Redis keeps of an experiment's request (key ``req:<id>``, see
layout.py) so that feedback on it counts for its arm and unit, or what a signed request id
carries instead of it. One type, one encoding: JSON with short keys."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from abproxy.recording import ids


@dataclass(frozen=True, slots=True)
class RequestRecord:
    experiment: str
    variant: str
    arm: str
    """``variant@hash``: the arm the feedback counts for."""
    unit: str | None
    """The hashed unit id (layout.hash_unit), or None for a request without a user."""
    forced: bool
    """Served by an override (a header, a promotion, a stopped arm): kept out of the statistics."""
    trace_id: str | None = None
    """The MLflow trace the request was written as: feedback on it becomes an assessment."""
    started_at: float | None = None
    status: int | None = None

    def encode(self) -> str:
        raw: dict[str, Any] = {"e": self.experiment, "v": self.variant, "a": self.arm, "u": self.unit, "f": self.forced}
        if self.started_at is not None:
            raw["t"] = self.started_at
        if self.status is not None:
            raw["s"] = self.status
        if self.trace_id is not None:
            raw["tr"] = self.trace_id
        return orjson.dumps(raw).decode()

    @classmethod
    def decode(cls, text: str | bytes) -> RequestRecord:
        """Raises ValueError for anything :meth:`encode` did not write."""
        try:
            raw = orjson.loads(text)
            return cls(
                str(raw["e"]), str(raw["v"]), str(raw["a"]), raw.get("u"), bool(raw.get("f")),
                raw.get("tr") or None, raw.get("t"), raw.get("s"),
            )  # fmt: skip
        except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError) as error:
            raise ValueError(f"not a request record: {error}") from None

    @classmethod
    def of_signed(cls, signed: ids.SignedId) -> RequestRecord:
        """What a signed id carries, as the record Redis would have kept."""
        return cls(signed.experiment, signed.variant, signed.arm, signed.unit, signed.forced,
                   signed.trace_id if signed.traced else None)  # fmt: skip
