"""abproxy: an OpenAI-compatible proxy that A/B tests prompt variants on live traffic.

``from abproxy import create_app`` gives its HTTP surface as a Starlette application (imported
on first use, so that ``import abproxy`` and the command line stay light)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from abproxy.app import create_app

__all__ = ["create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from abproxy.app import create_app

        return create_app
    raise AttributeError(f"module 'abproxy' has no attribute {name!r}")
