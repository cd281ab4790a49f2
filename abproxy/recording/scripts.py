"""The Lua that updates Redis (``abproxy/recording/lua/``, package data), and how it is called."""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any, TypeVar

from redis.exceptions import NoScriptError

from abproxy.recording import connection


def load_lua(name: str) -> str:
    """A script of ``abproxy/recording/lua/``."""
    return resources.files("abproxy.recording").joinpath("lua", name).read_text(encoding="utf-8")


_LUA_COMMON = load_lua("common.lua")
"""Helpers the recording scripts share (lua/common.lua): per-unit totals and shifts."""

RECORD_BATCH_LUA = _LUA_COMMON + load_lua("record_batch.lua")

RECORD_FEEDBACK_LUA = _LUA_COMMON + load_lua("record_feedback.lua")


FIND_ALIAS_LUA = load_lua("find_alias.lua")


SAVE_STATE_LUA = load_lua("save_state.lua")


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

