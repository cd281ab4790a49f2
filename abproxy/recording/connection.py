"""Connecting to Redis: one server, or a Redis Cluster, told apart from ``redis_url`` alone.

On a cluster every experiment lives in one slot (its keys share the hash tag ``{experiment}``):
work for several experiments is split per slot and each slot is written on its own, so one
slot that fails (its master down, a failover under way) holds up no other. A write the recorder
drops from memory is first confirmed by a replica (``WAIT``), so a master dying after answering
cannot take it along.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import redis as sync_redis
from redis._parsers.commands import AsyncCommandsParser
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

log = logging.getLogger("abproxy.recording.connection")

REDIS_FAILURES: tuple[type[Exception], ...] = (RedisError, RedisClusterException)
"""What redis-py raises: its cluster client raises RedisClusterException, which is no
RedisError, when no node it knows of answers."""
UNAVAILABLE: tuple[type[Exception], ...] = (*REDIS_FAILURES, OSError)

REPLICA_WAIT_MS = 1000
"""How long a recorder batch waits for a replica's acknowledgement before it counts as
unconfirmed (and is written again, which its dedupe key makes harmless)."""
FEEDBACK_WAIT_MS = 200
"""The same for a feedback score, whose client waits: within the request-facing timeout. An
unconfirmed score answers 503, and posting it again replaces it, never counts it twice."""


def is_cluster(url: str, timeout_s: float = 2.0) -> bool | None:
    """Whether the server at ``url`` runs in cluster mode; None when it cannot be reached."""
    probe = sync_redis.Redis.from_url(url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s)
    try:
        return bool(probe.info("cluster").get("cluster_enabled"))
    except (sync_redis.RedisError, OSError):
        return None
    finally:
        probe.close()


def detect_cluster(url: str) -> bool:
    """:func:`is_cluster`, taking a server that cannot be reached for a single Redis (and saying so)."""
    cluster = is_cluster(url)
    if cluster is None:
        log.warning(
            "Redis at %s does not answer: taken for a single Redis, not a cluster node (restart abproxy once it answers)",
            _without_password(url),
        )
    return bool(cluster)


CONNECTIONS_PER_CLIENT = 256
"""Connections a client opens at most (to each node, on a cluster). redis-py's default pool
refuses a command at once when its 100 connections are busy: the 101st feedback posted at the same
moment was a 503. With one Redis, a command past the cap waits for a free connection within the
client's timeout instead; a cluster client (which cannot wait) has room for 256 per node."""


def open_redis(url: str, timeout_s: float = 5.0, *, cluster: bool | None = None) -> Redis | RedisCluster:
    """A client of ``url``: a cluster client when that server is a cluster node (asked now, unless
    ``cluster`` says), else a plain one."""
    if cluster is None:
        cluster = detect_cluster(url)
    # One immediate retry (a pooled connection may be stale after a Redis restart, a cluster's
    # layout may have changed), no backoff: the recorder has its own, and a client waiting on an
    # answer wants a 503, not a hang.
    options: dict[str, Any] = dict(
        decode_responses=True,
        socket_connect_timeout=min(2.0, timeout_s),
        socket_timeout=timeout_s,
        retry=Retry(NoBackoff(), 1),
    )
    if cluster:
        client = RedisCluster.from_url(url, max_connections=CONNECTIONS_PER_CLIENT, **options)
        client.commands_parser = _AnyMasterCommandsParser(client)
        return client
    pool = BlockingConnectionPool.from_url(url, max_connections=CONNECTIONS_PER_CLIENT, timeout=timeout_s, **options)
    return Redis(connection_pool=pool)


class _AnyMasterCommandsParser(AsyncCommandsParser):
    """redis-py's cluster client, each time it re-learns the layout (after CLUSTERDOWN, say), makes
    the first master listed (slot 0's) its default node and asks only that one for the command
    table: with that master down and no replica taking over, every re-initialisation failed, and
    with it every experiment on the cluster. The table is the same on every node: ask the masters
    in turn, and make the first that answers the default node."""

    __slots__ = ("client",)

    def __init__(self, client: RedisCluster) -> None:
        super().__init__()
        self.client = client

    async def initialize(self, node: Any = None) -> None:
        masters = self.client.nodes_manager.get_nodes_by_server_type("primary")
        candidates = [node, *(master for master in masters if master is not node)] if node else masters
        failure: Exception | None = None
        for candidate in candidates:
            try:
                await super().initialize(candidate)
            except (RedisConnectionError, RedisTimeoutError, OSError) as error:
                failure = error
                continue
            self.client.nodes_manager.default_node = candidate
            return
        raise failure or RedisClusterException("no master of the cluster answers")


def _without_password(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    return f"{scheme}{sep}{rest.rpartition('@')[2]}" if sep else url


def clustered(redis: Any) -> bool:
    return isinstance(redis, RedisCluster)


async def discover(redis: Any) -> None:
    """Learn every node of a cluster now, while the node named by ``redis_url`` answers: the
    client then finds the cluster through any node it knows, should that one go down."""
    if clustered(redis):
        try:
            await redis.initialize()
        except UNAVAILABLE as error:
            log.warning("could not reach the Redis Cluster yet (%s: %s)", type(error).__name__, error)


def by_slot(redis: Any, items: Iterable[tuple[str, Any]]) -> list[list[Any]]:
    """``(key, item)`` pairs grouped so that each group may go to Redis in one pipeline: per slot
    of the key on a cluster, all together on one Redis."""
    if not clustered(redis):
        group = [item for _, item in items]
        return [group] if group else []
    groups: dict[int, list[Any]] = {}
    for key, item in items:
        groups.setdefault(key_slot(key.encode()), []).append(item)
    return list(groups.values())


async def confirm_replicated(redis: RedisCluster, pipe: Any, key: str, wait_ms: int = REPLICA_WAIT_MS) -> Any:
    """Queue, at the end of ``pipe``, a ``WAIT`` for a replica of the master holding ``key``: it
    runs on the connection that carried the pipeline's writes there, so it waits for them.
    Returns the node, for :func:`replicated`."""
    await redis.initialize()
    node = redis.get_node_from_key(key)
    pipe.execute_command("WAIT", 1, wait_ms, target_nodes=node)
    return node


async def replicated(redis: RedisCluster, node: Any, acknowledged: int) -> bool:
    """Whether writes ``WAIT`` saw ``acknowledged`` replicas take are safe from the master's
    loss: yes if a replica has them, or if the master has no replica left to ask."""
    if acknowledged >= 1:
        return True
    role = await redis.execute_command("ROLE", target_nodes=node)
    return role[0] == "master" and not role[2]
