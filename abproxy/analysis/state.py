"""What an experiment keeps between looks: the running always-valid state of every comparison
and the declared winner. Every look merges its own into Redis (``scripts.SAVE_STATE_LUA``) and
answers from the merge, so every replica and every look extends one sequence.

The running states merge by minimum and intersection (commutative and idempotent while the
looks agree; a look that contradicts them starts the sequence again), the sample-ratio test's
p-value by minimum. The winner is kept with the counters it was declared on, so that later looks
can re-check it on what came after. The winner is a compare-and-set on a generation counter: a look
proposes a new winner only against the generation it read, so two replicas declaring at once
cannot overwrite each other; the one that loses answers with the winner that was kept. A winner
is revoked the same way, once, against the generation that declared it.
:func:`apply` is the same merge in Python, for the simulations and to check the Lua against."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from abproxy.stats.sequential import RunningState
from abproxy.stats.summary import Moments


@dataclass(frozen=True)
class Winner:
    arm: str | None = None
    """The declared winner's arm id (``variant@hash``); None before any."""
    generation: int = 0
    """How many times a winner was declared: the compare-and-set's version."""
    context: str = ""
    """What the winner was decided on (:func:`abproxy.analysis.analyse.decision_context`): a
    winner declared on another primary metric, control, guardrails, α or MDE is no winner now."""
    revoked: str | None = None
    """Why this winner was revoked (the metric it failed on), once it was: for good."""
    since: str = ""
    """The arms' counters when it was declared (:func:`encode_since`): what came after is the
    evidence that re-checks it."""


@dataclass(frozen=True)
class SampleRatioState:
    """The sequential sample-ratio test's running p-value on one context (the arms checked and
    their weights, :func:`abproxy.analysis.analyse.sample_ratio_context`): it only goes down, so
    an experiment flagged stays flagged until its weights change."""

    context: str
    p_value: float

    def merge(self, other: SampleRatioState) -> SampleRatioState:
        if other.context != self.context:
            return other  # the weights changed: the test starts again on them
        return self if self.p_value <= other.p_value else other

    def encode(self) -> str:
        return f"{self.context}|{self.p_value!r}"

    @classmethod
    def decode(cls, text: str | None) -> SampleRatioState | None:
        context, _, p = (text or "").partition("|")
        try:
            p_value = float(p)
        except ValueError:
            return None
        return cls(context, p_value) if context and 0 <= p_value <= 1 else None


@dataclass(frozen=True)
class KeptState:
    running: Mapping[str, RunningState] = field(default_factory=dict)
    """By field of ``layout.sequential_key``: ``arm|other arm|metric``."""
    winner: Winner = Winner()
    sample_ratio: SampleRatioState | None = None


@dataclass(frozen=True)
class StateUpdate:
    """What one look asks Redis to keep."""

    running: Mapping[str, RunningState]
    fields: tuple[str, ...]
    """Every field the look reads back (those it has no new look for included)."""
    expected_generation: int
    winner: str | None = None
    """A newly declared winner's arm id; None to leave the winner as it is."""
    context: str = ""
    sample_ratio: SampleRatioState | None = None
    revoked: str | None = None
    """The winner the look read fails (on this metric): revoke it, unless Redis keeps another."""
    since: str = ""
    """With a new winner: the arms' counters this look read (:func:`encode_since`)."""


Since = Mapping[str, Mapping[str, Moments]]
"""Arm id → metric → the metric's moments when the winner was declared."""


def encode_since(since: Since) -> str:
    return json.dumps(
        {arm: {metric: [m.n, m.total, m.total_squares, m.shift] for metric, m in metrics.items()} for arm, metrics in since.items()},
        separators=(",", ":"),
    )


def decode_since(text: str) -> dict[str, dict[str, Moments]]:
    """Empty for anything that is not what :func:`encode_since` writes (written by hand, corrupt):
    then nothing is re-checked on what came after, as before the re-check existed."""
    try:
        raw = json.loads(text) if text else {}
        decoded = {
            str(arm): {str(metric): _moments(values) for metric, values in metrics.items()} for arm, metrics in raw.items()
        }
    except (ValueError, TypeError, AttributeError):
        return {}
    return decoded


def _moments(values: list[float]) -> Moments:
    numbers = [float(value) for value in values]
    if len(numbers) != 4 or not all(map(math.isfinite, numbers)):
        raise ValueError("not the moments encode_since writes")
    return Moments(*numbers)


def decode(raw_states: Mapping[str, str], raw_winner: Mapping[str, str]) -> KeptState:
    """From the Redis hashes; a state that does not decode (written by hand, corrupt) is
    dropped, as if never kept."""
    running = {}
    for name, text in raw_states.items():
        state = RunningState.decode(text)
        if state is not None:
            running[name] = state
    try:
        generation = int(raw_winner.get("generation", 0))
    except ValueError:
        generation = 0
    winner = Winner(
        raw_winner.get("winner") or None,
        generation,
        raw_winner.get("context", ""),
        raw_winner.get("revoked") or None,
        raw_winner.get("since", ""),
    )
    return KeptState(running, winner, SampleRatioState.decode(raw_winner.get("srm")))


def apply(kept: KeptState, update: StateUpdate) -> KeptState:
    """The state after ``update`` is merged into ``kept``, as ``scripts.SAVE_STATE_LUA`` does it."""
    running = dict(kept.running)
    for name, state in update.running.items():
        before = running.get(name)
        running[name] = before.merge(state) if before is not None else state
    winner = kept.winner
    if update.winner is not None and kept.winner.generation == update.expected_generation:
        winner = Winner(update.winner, update.expected_generation + 1, update.context, None, update.since)
    elif update.revoked is not None and kept.winner.generation == update.expected_generation and not winner.revoked:
        winner = Winner(winner.arm, winner.generation, winner.context, update.revoked, winner.since)
    sample_ratio = kept.sample_ratio
    if update.sample_ratio is not None:
        sample_ratio = sample_ratio.merge(update.sample_ratio) if sample_ratio is not None else update.sample_ratio
    return KeptState(running, winner, sample_ratio)


def agrees(saved: KeptState, update: StateUpdate, answered: Winner) -> bool:
    """Whether what Redis now holds is what the look answered with (no other look came in
    between): the same states for its fields, and the same winner."""
    if saved.winner != answered:
        return False
    if update.sample_ratio is not None and saved.sample_ratio != update.sample_ratio:
        return False
    return all(saved.running.get(name) == state for name, state in update.running.items())
