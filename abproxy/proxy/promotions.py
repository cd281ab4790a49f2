"""Which experiments ``abproxy promote`` has closed: their promoted variant serves every new
request, on every replica. The request path reads an in-memory map; a background refresh keeps
it in step with Redis, so a promotion reaches every replica within a refresh interval without
a request ever waiting on Redis."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any

from abproxy.recording import store

log = logging.getLogger("abproxy.proxy.promotions")

REFRESH_S = 1.0


class Promotions:
    def __init__(self, experiments: Iterable[str], refresh_s: float = REFRESH_S):
        self._experiments = list(experiments)
        self._refresh_s = refresh_s
        self.current: dict[str, str] = {}
        """Experiment → promoted variant."""

    def variant_for(self, experiment: str) -> str | None:
        return self.current.get(experiment)

    def set(self, experiment: str, variant: str | None) -> None:
        """This replica's own promote or undo takes effect at once (the others at their refresh)."""
        if variant is None:
            self.current.pop(experiment, None)
        else:
            self.current[experiment] = variant

    async def refresh(self, redis: Any) -> None:
        if self._experiments:
            self.current = await store.read_promotions(redis, self._experiments)

    async def watch(self, redis: Any) -> None:
        while True:
            try:
                await self.refresh(redis)
            except Exception as error:  # Redis away: keep serving what was known
                log.debug("could not refresh promotions (%s)", type(error).__name__)
            await asyncio.sleep(self._refresh_s)
