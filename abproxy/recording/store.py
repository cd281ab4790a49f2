"""Reads and writes of the Redis layout (keys.py) that are not a recording script: an
experiment's counters and kept state in one round trip, the overrides every replica follows
(promoted variant, stopped arms), saving a look's state, and the flush's fencing token."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from redis.exceptions import ResponseError

from abproxy.errors import StoreUnavailable
from abproxy.recording import connection
from abproxy.recording.counters import ArmCounters, parse_arm
from abproxy.recording.overrides import Overrides, Stop
from abproxy.recording.layout import (
    FLUSH_FENCE_KEY,
    LEGACY_FLUSH_FENCE_KEY,
    experiment_tag,
    hist_key,
    promoted_key,
    sequential_key,
    stats_key,
    stopped_key,
    unit_schemas_key,
    verdict_key,
)
from abproxy.recording.scripts import SAVE_STATE_LUA, Script



@contextmanager
def reachable() -> Iterator[None]:
    """Redis failing inside the block becomes :class:`~abproxy.errors.StoreUnavailable`."""
    try:
        yield
    except connection.UNAVAILABLE:
        raise StoreUnavailable("Redis is unavailable; retry later") from None


async def read_arms(
    redis: Any, experiment: str, arms: list[str], stored_names: Mapping[str, str] | None = None
) -> dict[str, ArmCounters]:
    """The counters of the given arms, in one round trip."""
    counters, _, _ = await read_experiment(redis, experiment, arms, stored_names)
    return counters


async def read_experiment(
    redis: Any, experiment: str, arms: list[str], stored_names: Mapping[str, str] | None = None
) -> tuple[dict[str, ArmCounters], dict[str, str], dict[str, str]]:
    """The counters of the given arms, the running states and the declared winner, in one round
    trip (``stored_names``: see :func:`parse_arm`)."""
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
        counters[arm] = parse_arm(arm, replies[2 * i], replies[2 * i + 1], stored_names)
        counters[arm].unreadable = [
            f"{key} is not a hash" for key in (*keys[2 * i : 2 * i + 2], shared[0]) if key in unreadable
        ]
    return counters, replies[-2], replies[-1]


async def read_hashes(redis: Any, keys: list[str]) -> list[dict[str, str]]:
    """Hashes of one experiment (one slot), in one round trip."""
    if not keys:
        return []
    pipe = redis.pipeline(transaction=False)
    for key in keys:
        pipe.hgetall(key)
    return list(await pipe.execute())


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

