"""What every error the proxy answers itself looks like: OpenAI's error shape."""

from __future__ import annotations

from typing import Any


def assert_openai_error(body: Any) -> None:
    assert isinstance(body, dict) and isinstance(body.get("error"), dict), body
    error = body["error"]
    assert isinstance(error.get("message"), str) and error["message"]
    assert isinstance(error.get("type"), str) and error["type"]
    assert "code" in error
