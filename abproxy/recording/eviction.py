"""A Redis that evicts keys when its memory is full (a ``maxmemory-policy`` other than
``noeviction``: ElastiCache's and Azure Cache's defaults among them) drops counters, feedback
records and per-user sums without a word: totals come out short, a re-posted score counts as new.

``abproxy serve`` refuses such a Redis unless ``redis_allow_eviction: true`` (:func:`evicting_masters`,
read from ``INFO``, since managed Redis often disables ``CONFIG``). Keys evicted while abproxy uses
it are counted from ``evicted_keys`` of every master's ``INFO`` (:func:`observe`) into a marker
in Redis — so every replica and ``abproxy report`` see it, and it outlives the replica that
noticed — and every experiment's results then carry the warning ``redis_evicted_keys``.

Counting: the marker keeps, per master, the last reading it counted (the server's ``run_id``, its
clock, ``evicted_keys`` and ``total_commands_processed``); a reading adds what ``evicted_keys``
grew by since. A master that restarted (another ``run_id``) or whose statistics were reset
(``CONFIG RESETSTAT``: its command count went down, having started again from 0) counted from 0
again, so all of its count is new; evictions between the last reading and the reset are not
counted. A reading older than the kept one (another replica's, taken earlier but arriving later)
adds nothing. Evictions before abproxy first looked at a master are not counted: they were not
abproxy's keys. A process remembers what it counted, so the marker, a key like any other, is put
back should it be evicted itself.

Every look at the results observes (one ``INFO`` per master, and a script that writes only when
something changed), so ``abproxy report`` and a replica's periodic refresh notice by themselves;
:func:`watch_evictions` does it every few seconds besides, whether anyone looks or not.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from abproxy.config import Config
from abproxy.recording import connection, layout, scripts

log = logging.getLogger("abproxy.recording.eviction")

REDIS_EVICTED_KEYS = "redis_evicted_keys"
"""The warning on every experiment's results once Redis evicted keys."""
MARKER_KEY = f"{layout.FLUSH_TAG}:evictions"
"""A hash: ``count`` (keys evicted since abproxy watches), ``first_seen`` (Unix time), and per
master ``node:<host:port>`` = ``<run_id> <server time µs> <evicted_keys> <commands processed>``, the
reading last counted."""
CHECK_INTERVAL_S = 10.0
"""How often a replica reads every master's ``evicted_keys`` (:func:`watch_evictions`)."""
SAFE_POLICY = "noeviction"

OBSERVE_LUA = scripts.load_lua("observe_evictions.lua")
_OBSERVE = scripts.Script(OBSERVE_LUA)


@dataclass(frozen=True)
class Evictions:
    count: int
    """Keys Redis evicted since abproxy first looked at its masters."""
    first_seen: float | None
    """When abproxy first saw one evicted (Unix time)."""
    new: int
    """Of ``count``, those this observation was the first to see."""


@dataclass
class Remembered:
    """What one process counted: put back into the marker should Redis lose it."""

    nodes: dict[str, str] = field(default_factory=dict)
    counts: dict[str, tuple[int, str]] = field(default_factory=dict)
    """Per node holding the marker: its count and first_seen."""


_PROCESS = Remembered()


@dataclass(frozen=True)
class _Reading:
    node: str
    run_id: str
    at_us: int
    evicted: int
    commands: int
    policy: str

    def kept(self) -> str:
        return f"{self.run_id} {self.at_us} {self.evicted} {self.commands}"


async def _readings(redis: Any) -> list[_Reading]:
    """``INFO`` of every master, in one call each (its clock and its count from one instant)."""
    if connection.clustered(redis):
        await redis.initialize()
        masters = [
            (node.name, await redis.execute_command("INFO", target_nodes=node)) for node in redis.get_primaries()
        ]
    else:
        kwargs = redis.connection_pool.connection_kwargs
        name = kwargs.get("path") or f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}"
        masters = [(name, await redis.info())]
    return [
        _Reading(
            node=name,
            run_id=str(info.get("run_id", "unknown")),
            # server_time_usec is Redis 6.2's and later's; before, this process's clock
            at_us=int(info.get("server_time_usec") or time.time() * 1_000_000),
            evicted=int(info.get("evicted_keys", 0)),
            commands=int(info.get("total_commands_processed", 0)),
            policy=str(info.get("maxmemory_policy", "unknown")),
        )
        for name, info in masters
    ]


async def evicting_masters(redis: Any) -> dict[str, str]:
    """The masters whose ``maxmemory-policy`` may evict keys: ``host:port`` → policy."""
    return {reading.node: reading.policy for reading in await _readings(redis) if reading.policy != SAFE_POLICY}


def _marker_node(redis: Any, readings: list[_Reading]) -> str:
    if connection.clustered(redis):
        return str(redis.get_node_from_key(MARKER_KEY).name)
    return readings[0].node


async def _count(redis: Any, args: list[Any]) -> tuple[int, str, int]:
    """One master's reading into the marker: its count, first_seen, and what this reading added."""
    reply = await _OBSERVE.run(redis, lambda sha: redis.evalsha(sha, 1, MARKER_KEY, *args), MARKER_KEY)
    return int(reply[0]), str(reply[1]), int(reply[2])


async def observe(redis: Any, remembered: Remembered | None = None) -> Evictions:
    """Count what every master evicted since the readings the marker keeps; the marker's totals.
    ``remembered``: what this process counted before (by default the process's own memory)."""
    memory = _PROCESS if remembered is None else remembered
    readings = await _readings(redis)
    marker_node = _marker_node(redis, readings)
    count, first_seen, new = 0, "", 0
    for reading in readings:
        kept_count, kept_first = memory.counts.get(marker_node, (0, ""))
        args = [reading.node, reading.run_id, reading.at_us, reading.evicted, reading.commands, int(time.time()),
                memory.nodes.get(reading.node, ""), kept_count, kept_first]  # fmt: skip
        count, first_seen, added = await _count(redis, args)
        new += added
        memory.nodes[reading.node] = reading.kept()
        if count:
            memory.counts[marker_node] = (count, first_seen)
    return Evictions(count, float(first_seen) if first_seen else None, new)


def _evicting_masters(redis_url: str) -> dict[str, str] | None:
    """The masters of ``redis_url`` whose ``maxmemory-policy`` evicts keys (None: Redis did not
    answer). Also takes the baseline of what Redis evicted so far: none of it was abproxy's."""

    async def check() -> dict[str, str]:
        redis = connection.open_redis(redis_url)
        try:
            evicting = await evicting_masters(redis)
            await observe(redis)
            return evicting
        finally:
            await redis.aclose()

    try:
        return asyncio.run(check())
    except connection.UNAVAILABLE as error:  # Redis down at start is served through (batches wait): say what was not checked
        log.warning(
            "could not read Redis's maxmemory-policy (%s: %s): not checked", type(error).__name__, error
        )
        return None


def startup_problem(config: Config) -> str | None:
    """Why ``abproxy serve`` on ``redis_url`` would lose counts without a word, if it would: a
    master whose ``maxmemory-policy`` evicts keys. With ``redis_allow_eviction: true``, a warning
    instead. Not for an event loop: it runs one."""
    evicting = _evicting_masters(config.redis_url)
    if not evicting:
        return None
    masters = ", ".join(f"{node} has maxmemory-policy {policy}" for node, policy in evicting.items())
    if config.redis_allow_eviction:
        log.warning(
            "redis_allow_eviction: true: Redis %s: keys it evicts when full lose counts; every experiment's "
            "results will carry the warning %s once it does", masters, REDIS_EVICTED_KEYS,
        )  # fmt: skip
        return None
    return (
        f"redis_url: Redis {masters}: when its memory is full it evicts keys, and abproxy's counters, feedback "
        "and per-user sums would go missing without a word (totals short, re-posted scores counted as new). "
        "Set it to noeviction: `CONFIG SET maxmemory-policy noeviction` (and in redis.conf), or on managed Redis "
        "the maxmemory-policy of its parameter group (ElastiCache) or configuration (Azure Cache, Memorystore). "
        f"Or set redis_allow_eviction: true to serve anyway, with the warning {REDIS_EVICTED_KEYS} on every "
        "experiment's results once keys are evicted."
    )


def _log_new(evictions: Evictions) -> None:
    if evictions.new:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(evictions.first_seen or time.time()))
        log.warning(
            "Redis evicted %d key(s) (%d since %s): counters, feedback or per-user sums may be missing; every "
            "experiment's results carry the warning %s. Give Redis more memory, or set maxmemory-policy noeviction",
            evictions.new, evictions.count, since, REDIS_EVICTED_KEYS,
        )  # fmt: skip


async def warnings(redis: Any) -> tuple[str, ...]:
    """For a look at the results: ``(REDIS_EVICTED_KEYS,)`` once Redis evicted keys. Never fails
    the look: a Redis that refuses ``INFO`` or the write leaves the marker as it is, read alone."""
    try:
        evictions = await observe(redis)
    except connection.UNAVAILABLE as error:
        log.debug("evictions not observed (%s: %s)", type(error).__name__, error)
        try:
            return (REDIS_EVICTED_KEYS,) if int(await redis.hget(MARKER_KEY, "count") or 0) else ()
        except connection.UNAVAILABLE:
            return ()
    _log_new(evictions)
    return (REDIS_EVICTED_KEYS,) if evictions.count else ()


async def watch_evictions(redis: Any, interval_s: float = CHECK_INTERVAL_S) -> None:
    """Every ``interval_s``: count what Redis evicted (and log it), so that a replica notices
    even while nobody looks at the results."""
    while True:
        try:
            _log_new(await observe(redis))
        except connection.UNAVAILABLE as error:
            log.debug("evictions not observed (%s: %s)", type(error).__name__, error)
        await asyncio.sleep(interval_s)
