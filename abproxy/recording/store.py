"""The Redis layout: the one place that knows key names, and the Lua that updates them.

Every key of an experiment carries the hash tag ``{experiment}``, so one experiment lives in
one Redis Cluster slot and one script call per batch writes all of it atomically, request
records included (feedback, which arrives with a request id alone, looks in each experiment).

Per arm (``variant@hash``), hash ``a:<arm>`` holds integer counters (``requests``, ``errors``,
``cancelled``, ``units``) and, per metric ``m``, ``m|n`` (count), ``m|s`` (Σx), and about the
metric's shift ``m|k`` (the first batch's mean, fixed once chosen; 0 for data older than shifts)
``m|t`` (Σ(x − k), kept only when k ≠ 0) and ``m|q`` (Σ(x − k)²), so that variances of values
around 1e12 keep their digits; plus the per-unit sums the delta method needs for ``unit: user``
experiments (and, for the design effect, for the primary metric of ``unit: request`` ones),
with Y_u about the same shift: ``m|uk`` (units with the metric), ``m|uyy`` (Σ Y_u²), ``m|unn``
(Σ N_u²), ``m|uyn`` (Σ Y_u·N_u). Hash ``h:<arm>`` holds the histogram, field ``m|<bucket>``.

Between looks: hash ``seq`` holds each comparison's running always-valid state, hash ``verdict``
the declared winner and its generation (:data:`SAVE_STATE_LUA` merges a look into both).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, TypeVar

from redis.exceptions import NoScriptError, ResponseError

from abproxy.errors import StoreUnavailable
from abproxy.recording import connection
from abproxy.stats.summary import Moments

PREFIX = "abproxy"
BATCH_DEDUPE_TTL_S = 3600
"""A batch is replayed only after its reply was lost, at the recorder's next successful round:
seconds later, or once Redis answers again. Kept an hour, not for as long as requests are."""
UNIT_TTL_S = 90 * 24 * 3600
"""Per-user totals of a ``unit: user`` experiment are kept this long after the user's last
request or score: its statistics (the delta method) need a returning user's earlier totals. A
user returning later starts afresh (and counts as a new unit). Those of a ``unit: request``
experiment (its design effect alone) are kept ``feedback_ttl_s`` after the user's last request."""


def experiment_tag(experiment: str) -> str:
    return f"{PREFIX}:{{{experiment}}}"


def arms_key(experiment: str) -> str:
    return f"{experiment_tag(experiment)}:arms"


def stats_key(experiment: str, arm: str) -> str:
    return f"{experiment_tag(experiment)}:a:{arm}"


def hist_key(experiment: str, arm: str) -> str:
    return f"{experiment_tag(experiment)}:h:{arm}"


def unit_key(experiment: str, arm: str, unit_hash: str) -> str:
    return f"{experiment_tag(experiment)}:u:{arm}:{unit_hash}"


def unit_schemas_key(experiment: str) -> str:
    """The metric lists per-user totals are kept for, by a short id (:data:`_LUA_COMMON`)."""
    return f"{experiment_tag(experiment)}:us"


def feedback_key(experiment: str, request_id: str) -> str:
    return f"{experiment_tag(experiment)}:fb:{request_id}"


def sequential_key(experiment: str) -> str:
    """Running always-valid p-values, kept between looks so they never go back up."""
    return f"{experiment_tag(experiment)}:seq"


def promoted_key(experiment: str) -> str:
    """The variant ``abproxy promote`` made every replica serve to all new traffic."""
    return f"{experiment_tag(experiment)}:promoted"


def stopped_key(experiment: str) -> str:
    """Arms stopped for harm: arm id → :class:`Stop` as JSON. A resumed arm keeps its entry,
    marked resumed: it is never stopped again on its own."""
    return f"{experiment_tag(experiment)}:stopped"


def verdict_key(experiment: str) -> str:
    """The declared winner (``winner``: its arm), ``generation`` (bumped at each declaration),
    ``context`` (what it was decided on: primary metric, control, guardrails, α, MDE), ``since``
    (the arms' counters when it was declared), ``revoked`` and the sample-ratio test's ``srm``."""
    return f"{experiment_tag(experiment)}:verdict"


def runs_key(experiment: str) -> str:
    """MLflow ids: ``experiment_id``, ``summary`` and one run id per arm."""
    return f"{experiment_tag(experiment)}:runs"


def batch_key(experiment: str, batch_id: str) -> str:
    return f"{experiment_tag(experiment)}:batch:{batch_id}"


def request_key(experiment: str, request_id: str) -> str:
    return f"{experiment_tag(experiment)}:req:{request_id}"


def alias_prefix(experiment: str) -> str:
    """Hash buckets ``<prefix><hour>:<level>:<bucket>`` of the upstream's response ids: field and
    bucket from the id's hash (ids.response_hash); value, ids.alias_value, or '' when two requests
    got that response id. An hour's aliases fill 1, 4, 16... buckets (level 0, 1, 2...) as they
    grow in number, so each holds at most about 48 and stays a small listpack
    (``hash-max-listpack-entries``, 128 by default): a bucket key costs ~130 B, an entry ~60 B."""
    return f"{experiment_tag(experiment)}:r:"


def alias_counts_key(experiment: str) -> str:
    """Hash: hour → aliases written in it (which bucket levels a reader must try)."""
    return f"{experiment_tag(experiment)}:rc"


ALIAS_FIRST_BUCKET = 64
ALIAS_MAX_LEVEL = 8


def alias_level(count: int) -> int:
    """The level of an hour's ``count``-th alias: level L holds those past 64·4^(L−1) up to
    64·4^L, in 4^L buckets."""
    level, limit = 0, ALIAS_FIRST_BUCKET
    while count > limit and level < ALIAS_MAX_LEVEL:
        level += 1
        limit *= 4
    return level


def alias_key(experiment: str, hour: int | str, level: int, number: int) -> str:
    return f"{alias_prefix(experiment)}{hour}:{level}:{number % 4**level}"


def response_key(experiment: str, response_id: str) -> str:
    """An alias: the upstream's own response id (``chatcmpl-...``) → the request id."""
    return f"{experiment_tag(experiment)}:resp:{response_id}"


def sequential_field(arm: str, other_arm: str, metric: str) -> str:
    """Field of :func:`sequential_key` for ``arm`` − ``other_arm`` on one metric (the other arm
    is the control, or for head-to-head comparisons another treatment), so an edited arm (a new
    hash) starts afresh."""
    return f"{arm}|{other_arm}|{metric}"


# Flush coordination, shared by every experiment: one hash tag of its own, so that on a Redis
# Cluster the three keys live in one slot like an experiment's do.
FLUSH_TAG = f"{PREFIX}:{{flush}}"
FLUSH_LOCK_KEY = f"{FLUSH_TAG}:lock"
"""Held by the one flush running, with a TTL."""
FLUSH_INTERVAL_KEY = f"{FLUSH_TAG}:interval"
"""Taken by the one replica that flushes in this interval."""
FLUSH_FENCE_KEY = f"{FLUSH_TAG}:fence"
"""A counter: the fencing token of each flush, which is also MLflow's ``step``."""
LEGACY_FLUSH_FENCE_KEY = f"{PREFIX}:flush:fence"
"""Where the fencing token lived before the flush keys shared a hash tag: read once, by the
first flush that finds :data:`FLUSH_FENCE_KEY` absent, so that step numbers go on."""


@contextmanager
def reachable() -> Iterator[None]:
    """Redis failing inside the block becomes :class:`~abproxy.errors.StoreUnavailable`."""
    try:
        yield
    except connection.UNAVAILABLE:
        raise StoreUnavailable("Redis is unavailable; retry later") from None


@functools.lru_cache(maxsize=65_536)  # the request path (signed ids) and the recorder ask for each request
def hash_unit(unit_id: str) -> str:
    """Unit ids are the app's user ids: keep them out of key names."""
    return hashlib.sha256(unit_id.encode()).hexdigest()[:32]


def load_lua(name: str) -> str:
    """A script of ``abproxy/recording/lua/``."""
    return resources.files("abproxy.recording").joinpath("lua", name).read_text(encoding="utf-8")


_LUA_COMMON = load_lua("common.lua")
"""Helpers the recording scripts share (lua/common.lua): per-unit totals and shifts."""

RECORD_BATCH_LUA = _LUA_COMMON + load_lua("record_batch.lua")

RECORD_FEEDBACK_LUA = _LUA_COMMON + load_lua("record_feedback.lua")


FIND_ALIAS_LUA = load_lua("find_alias.lua")


SAVE_STATE_LUA = load_lua("save_state.lua")


@dataclass(slots=True)
class MetricCounters:
    """One metric of one arm as read back from Redis."""

    moments: Moments = Moments()
    histogram: dict[str, int] = field(default_factory=dict)
    units: int = 0
    unit_yy: float = 0.0
    """Σ Y_u², with Y_u about ``moments.shift``; likewise the other two."""
    unit_nn: float = 0.0
    unit_yn: float = 0.0
    corrupt: bool = False
    """Some counter of it is not a finite number: nothing may be concluded from it."""


@dataclass(slots=True)
class ArmCounters:
    arm: str
    requests: int = 0
    errors: int = 0
    cancelled: int = 0
    units: int = 0
    metrics: dict[str, MetricCounters] = field(default_factory=dict)
    corrupt: list[str] = field(default_factory=list)
    """Every counter of the arm that is not a finite number (``requests``, ``latency_ms|q``, …)."""
    unreadable: list[str] = field(default_factory=list)
    """Keys of the arm that Redis could not read as hashes (a key of another type), with why:
    nothing of the arm can be trusted."""


def _finite(value: str) -> float | None:
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def parse_arm(arm: str, stats: dict[str, str], hist: dict[str, str]) -> ArmCounters:
    """The counters of one arm; a counter that is not a finite number, or a count that is no
    integer (a hand edit, a bug), is listed in ``corrupt`` and counts as 0, and its metric is
    marked corrupt."""
    corrupt: list[str] = []

    def count(name: str) -> int:
        value = _finite(stats.get(name, "0"))
        if value is None or not value.is_integer():
            corrupt.append(name)
            return 0
        return int(value)

    counters = ArmCounters(
        arm=arm, requests=count("requests"), errors=count("errors"), cancelled=count("cancelled"), units=count("units")
    )
    raw: dict[str, dict[str, Any]] = {}
    for key, value in stats.items():
        metric, sep, part = key.rpartition("|")
        if sep:
            parts = raw.setdefault(metric, {})
            number = _finite(value)
            if number is None:
                corrupt.append(key)
                parts["corrupt"] = True
            else:
                parts[part] = number
    for key, value in hist.items():
        metric, sep, bucket = key.partition("|")
        if not sep:
            continue
        number = _finite(value)
        if number is None or not number.is_integer():
            corrupt.append(f"{metric}|h:{bucket}")
            raw.setdefault(metric, {})["corrupt"] = True
        elif number != 0:
            raw.setdefault(metric, {}).setdefault("hist", {})[bucket] = int(number)
    for metric, parts in raw.items():
        shift = parts.get("k", 0.0)
        total = parts.get("t", 0.0) if shift != 0 else parts.get("s", 0.0)
        counters.metrics[metric] = MetricCounters(
            moments=Moments(parts.get("n", 0.0), total, parts.get("q", 0.0), shift),
            histogram=parts.get("hist", {}),
            units=int(parts.get("uk", 0)),
            unit_yy=parts.get("uyy", 0.0),
            unit_nn=parts.get("unn", 0.0),
            unit_yn=parts.get("uyn", 0.0),
            corrupt=bool(parts.get("corrupt")),
        )
    counters.corrupt = corrupt
    return counters


async def read_arms(redis: Any, experiment: str, arms: list[str]) -> dict[str, ArmCounters]:
    """The counters of the given arms, in one round trip."""
    counters, _, _ = await read_experiment(redis, experiment, arms)
    return counters


async def read_experiment(
    redis: Any, experiment: str, arms: list[str]
) -> tuple[dict[str, ArmCounters], dict[str, str], dict[str, str]]:
    """The counters of the given arms, the running states and the declared winner, in one round trip."""
    keys = [key for arm in arms for key in (stats_key(experiment, arm), hist_key(experiment, arm))]
    # the unit schemas only to learn that they are a hash: the recorder cannot write per-user sums otherwise
    shared = [unit_schemas_key(experiment), sequential_key(experiment), verdict_key(experiment)]
    pipe = redis.pipeline(transaction=False)
    for key in keys + shared:
        pipe.hgetall(key)
    unreadable: set[str] = set()
    try:
        replies = await pipe.execute()
    except ResponseError as error:
        if not _wrong_type(error):
            raise
        replies, unreadable = await _read_hashes_one_by_one(redis, keys + shared)
    counters = {}
    for i, arm in enumerate(arms):
        counters[arm] = parse_arm(arm, replies[2 * i], replies[2 * i + 1])
        counters[arm].unreadable = [
            f"{key} is not a hash" for key in (*keys[2 * i : 2 * i + 2], shared[0]) if key in unreadable
        ]
    return counters, replies[-2], replies[-1]


def _wrong_type(error: ResponseError) -> bool:
    return "WRONGTYPE" in str(error)


async def _read_hashes_one_by_one(redis: Any, keys: list[str]) -> tuple[list[dict[str, str]], set[str]]:
    """Hashes read one by one, which a key of another type among them (a hand edit) makes
    necessary: that key reads as empty and is named in the second value."""
    hashes: list[dict[str, str]] = []
    unreadable: set[str] = set()
    for key in keys:
        try:
            hashes.append(await redis.hgetall(key))
        except ResponseError as error:
            if not _wrong_type(error):
                raise
            hashes.append({})
            unreadable.add(key)
    return hashes, unreadable


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


async def read_overrides(redis: Any, experiments: list[str]) -> dict[str, Overrides]:
    """Experiment → its overrides, for the experiments that have any: one pipeline per cluster
    slot (all together on one Redis)."""

    async def read(group: list[str]) -> list[Any]:
        pipe = redis.pipeline(transaction=False)
        for experiment in group:
            pipe.get(promoted_key(experiment))
            pipe.hgetall(stopped_key(experiment))
        return list(await pipe.execute())

    groups = connection.by_slot(redis, ((experiment_tag(e), e) for e in experiments))
    found: dict[str, Overrides] = {}
    for group in groups:
        replies = await read(group)
        for index, experiment in enumerate(group):
            promoted, raw_stops = replies[2 * index], replies[2 * index + 1]
            stops = {arm: stop for arm, text in raw_stops.items() if (stop := Stop.decode(text)) is not None}
            if promoted or stops:
                found[experiment] = Overrides(promoted or None, stops)
    return found


async def stop_arm(redis: Any, experiment: str, arm: str, stop: Stop) -> bool:
    """Record that ``arm`` is stopped, unless it was stopped (or resumed) before: True when this
    call stopped it."""
    return bool(await redis.hsetnx(stopped_key(experiment), arm, stop.encode()))


async def resume_arm(redis: Any, experiment: str, arm: str, now: float) -> Stop | None:
    """Give a stopped arm its traffic back, for good (it is not stopped again on its own); None
    when it is not stopped."""
    kept = await redis.hget(stopped_key(experiment), arm)
    stop = Stop.decode(kept) if kept else None
    if stop is None or not stop.active:
        return None
    resumed = Stop(stop.variant, stop.reason, stop.at, now)
    await redis.hset(stopped_key(experiment), arm, resumed.encode())
    return resumed


T = TypeVar("T")


class Script:
    """A Lua script called by its SHA, loaded where it is missing: on first use, after a Redis
    restart emptied the script cache, on a cluster node that never ran it (a replica that took
    over, say)."""

    def __init__(self, source: str):
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    async def run(self, redis: Any, call: Callable[[str], Awaitable[T]], key: str | None = None) -> T:
        """``call(sha)`` once, or twice if Redis had forgotten the script; ``key`` is one the
        call touches, to find the cluster node that needs the script."""
        try:
            return await call(self.sha)
        except NoScriptError:
            await self.load(redis, key)
            return await call(self.sha)

    async def load(self, redis: Any, key: str | None) -> None:
        if key is not None and connection.clustered(redis):
            await redis.initialize()
            await redis.execute_command("SCRIPT", "LOAD", self.source, target_nodes=redis.get_node_from_key(key))
        else:
            await redis.script_load(self.source)


_SAVE_STATE = Script(SAVE_STATE_LUA)


async def save_state(
    redis: Any,
    experiment: str,
    states: list[tuple[str, str]],
    expected_generation: int,
    winner: str | None,
    context: str = "",
    srm: str = "",
    revoked: str = "",
    since: str = "",
) -> tuple[dict[str, str], dict[str, str]]:
    """Merge a look's running states (field, encoded state or ''), its winner and its
    sample-ratio state (``context|p`` or '') into Redis, and revoke the winner it read (``revoked``:
    why, or ''), keeping ``since`` (the counters the declaring look read) with a new winner
    (:data:`SAVE_STATE_LUA`); returns what
    Redis keeps now, as :func:`read_experiment` reads it: the states of the given fields, and
    the verdict's hash."""
    keys = [sequential_key(experiment), verdict_key(experiment)]
    args: list[Any] = [expected_generation, winner or "", context, srm, revoked, since]
    for name, encoded in states:
        args += [name, encoded]
    reply = await _SAVE_STATE.run(redis, lambda sha: redis.evalsha(sha, len(keys), *keys, *args), keys[0])
    generation, kept_winner, kept_context, merged, kept_srm, kept_revoked, kept_since = reply
    kept = {name: value for (name, _), value in zip(states, merged, strict=True) if value}
    verdict = {"generation": str(generation), "winner": kept_winner, "context": kept_context}
    if kept_srm:
        verdict["srm"] = kept_srm
    if kept_revoked:
        verdict["revoked"] = kept_revoked
    if kept_since:
        verdict["since"] = kept_since
    return kept, verdict


async def next_flush_step(redis: Any) -> int:
    """The next fencing token; called under the flush lock. The first flush after an upgrade
    carries the count on from :data:`LEGACY_FLUSH_FENCE_KEY` (each key touched alone: on a
    cluster the two live in different slots, and there the legacy key never held anything)."""
    step = int(await redis.incr(FLUSH_FENCE_KEY))
    if step == 1:
        legacy = await redis.get(LEGACY_FLUSH_FENCE_KEY)
        if legacy:
            step = int(await redis.incrby(FLUSH_FENCE_KEY, int(legacy)))
            await redis.delete(LEGACY_FLUSH_FENCE_KEY)
    return step
