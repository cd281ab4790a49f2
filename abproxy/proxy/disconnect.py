"""A streamed answer whose client went away: the request's task is cancelled, so the upstream
call stops too (and the request is recorded as cancelled)."""

from __future__ import annotations

import asyncio
from typing import Any


class DisconnectWatch:
    """Cancels the request's task when the client goes away, so the upstream call stops too.

    Watching costs a task per request, so only streams are watched: they are the long calls.
    Must be stopped before the final ``send``: after it the server reports a disconnect."""

    def __init__(self, receive: Any, active: bool):
        self.gone = False
        self._target = asyncio.current_task() if active else None
        self._task = asyncio.ensure_future(self._watch(receive)) if active else None

    async def _watch(self, receive: Any) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self.gone = True
        if self._target is not None:
            self._target.cancel()

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
