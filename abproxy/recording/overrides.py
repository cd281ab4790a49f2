"""What every replica follows besides its config, as Redis keeps it (layout.promoted_key,
layout.stopped_key): the promoted variant and the arms stopped for harm. Pure: read and written
by store.py."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class Stop:
    """An arm stopped for harm on a guardrail (``reason``), at Unix time ``at``; ``resumed``: when
    ``abproxy resume`` gave it its traffic back."""

    variant: str
    reason: str
    at: float
    resumed: float | None = None

    @property
    def active(self) -> bool:
        return self.resumed is None

    def encode(self) -> str:
        return json.dumps({"variant": self.variant, "reason": self.reason, "at": self.at, "resumed": self.resumed})

    @classmethod
    def decode(cls, text: str) -> Stop | None:
        """None for anything but what :meth:`encode` writes (a hand edit)."""
        try:
            data = json.loads(text)
            return cls(str(data["variant"]), str(data["reason"]), float(data["at"]), _optional_float(data.get("resumed")))
        except (ValueError, TypeError, KeyError):
            return None


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


@dataclass(frozen=True, slots=True)
class Overrides:
    """What every replica must know of an experiment besides its config: the variant ``abproxy
    promote`` made serve all traffic, and the arms stopped for harm (by arm id)."""

    promoted: str | None = None
    stops: dict[str, Stop] = field(default_factory=dict)

    @property
    def stopped(self) -> frozenset[str]:
        """The arm ids that get no new traffic now."""
        return frozenset(arm for arm, stop in self.stops.items() if stop.active)
