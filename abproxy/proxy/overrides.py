"""What every replica must apply to an experiment's traffic besides its config: the variant
``abproxy promote`` made serve every new request, and the arms stopped for harm (whose units the
control serves). The request path reads an in-memory map; a background refresh keeps it in step
with Redis, so a promotion or a stop reaches every replica within a refresh interval without a
request ever waiting on Redis."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any

from abproxy.recording import store
from abproxy.recording.overrides import Overrides, Stop

log = logging.getLogger("abproxy.proxy.overrides")

REFRESH_S = 1.0


class LiveOverrides:
    def __init__(self, experiments: Iterable[str], refresh_s: float = REFRESH_S):
        self._experiments = list(experiments)
        self._refresh_s = refresh_s
        self.current: dict[str, Overrides] = {}
        self._local_changes = 0

    def promoted(self, experiment: str) -> str | None:
        found = self.current.get(experiment)
        return found.promoted if found is not None else None

    def stopped(self, experiment: str) -> frozenset[str]:
        """The arm ids of the experiment that get no new traffic."""
        found = self.current.get(experiment)
        return found.stopped if found is not None else frozenset()

    def set(self, experiment: str, overrides: Overrides) -> None:
        """This replica's own promote, undo or resume takes effect at once (the others at their
        refresh)."""
        self.current[experiment] = overrides
        self._local_changes += 1

    def set_promoted(self, experiment: str, variant: str | None) -> None:
        found = self.current.get(experiment, Overrides())
        self.set(experiment, Overrides(variant, found.stops))

    def set_stop(self, experiment: str, arm: str, stop: Stop) -> None:
        found = self.current.get(experiment, Overrides())
        self.set(experiment, Overrides(found.promoted, {**found.stops, arm: stop}))

    async def refresh(self, redis: Any) -> None:
        if not self._experiments:
            return
        changes = self._local_changes
        read = await store.read_overrides(redis, self._experiments)
        # A promote or resume of this replica's while the read was on its way is newer than what
        # was read: keep it (the next refresh reads it back from Redis).
        if changes == self._local_changes:
            self.current = read

    async def watch(self, redis: Any) -> None:
        while True:
            try:
                await self.refresh(redis)
            except Exception as error:  # Redis away: keep serving what was known
                log.debug("could not refresh the live overrides (%s)", type(error).__name__)
            await asyncio.sleep(self._refresh_s)
