"""Programs from outside Python that some tests run (Debian's promtool and prometheus,
docker-compose). On a machine without them such a test skips and says which program is missing
and how to get it; where ``ABPROXY_REQUIRE_TOOLS`` is set — CI, whose ``.ci/run`` installs them —
a missing one fails the test instead, so CI can never pass by skipping what it should run."""

from __future__ import annotations

import os
import shutil

import pytest

REQUIRE_ENV = "ABPROXY_REQUIRE_TOOLS"


def tools_required() -> bool:
    return os.environ.get(REQUIRE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def require_tool(name: str, install: str) -> str:
    """The path of the program ``name``; skips the test without it (fails it when required)."""
    found = shutil.which(name)
    if found:
        return found
    message = f"{name} is missing: {install}"
    if tools_required():
        pytest.fail(f"{message} ({REQUIRE_ENV} is set, so the test may not skip)", pytrace=False)
    pytest.skip(message)
