"""What a trace keeps of a big request or answer: pure functions, no I/O.

A trace is for reading, and it waits in the replica's memory until MLflow has its experiment:
a 60 MB answer kept whole would hold 60 MB there, and as much of MLflow's store after. So each
side keeps at most ``TRACED_BYTES``. A JSON body keeps its shape (the messages, their roles, the
parameters) and only its longest strings are cut, all to one length, each ending with a note of
how long it was — what a reader of the trace needs to see which message was long and how it
began. A body whose shape alone is too big (an array of a million token ids) keeps its first
bytes as text, with the same note."""

from __future__ import annotations

from typing import Any

import orjson

TRACED_BYTES = 1 << 20
"""What a trace keeps of the request as sent and of the answer, each (UTF-8 bytes)."""
_NOTE_BYTES = 64
"""Room for one note (``note``'s longest is under this)."""


def note(kept: int, whole: int) -> str:
    return f" … [abproxy: cut to its first {kept:,} of {whole:,} bytes]"


def trimmed_text(text: str, budget: int = TRACED_BYTES) -> tuple[str, bool]:
    """``text``, or its first bytes with a note, within ``budget`` bytes; and whether it was cut."""
    shortened = _shortened(text, budget, kept=budget - _NOTE_BYTES)
    return shortened, shortened is not text


def _shortened(text: str, limit: int, kept: int) -> str:
    """``text`` itself when it is at most ``limit`` bytes, else its first ``kept`` bytes (a
    character cut in two dropped) and a note of how long it was."""
    if len(text) <= limit // 4:  # 4 bytes a character at most: no need to encode
        return text
    encoded = text.encode()
    if len(encoded) <= limit:
        return text
    return encoded[:kept].decode("utf-8", "ignore") + note(kept, len(encoded))


def trimmed_json(body: bytes, budget: int = TRACED_BYTES) -> tuple[bytes, bool]:
    """``body``, or a JSON document of at most about ``budget`` bytes standing for it; and
    whether it was cut."""
    if len(body) <= budget:
        return body, False
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        document = None
    if document is not None:
        lengths: list[int] = []
        _string_lengths(document, lengths)
        limit = _common_length(lengths, len(body) - budget)
        if limit is not None:
            shorter = orjson.dumps(_cut_strings(document, limit))
            if len(shorter) <= budget + budget // 16:  # escapes the byte counts did not see
                return shorter, True
    text, _ = trimmed_text(body.decode("utf-8", "replace"), budget)
    return orjson.dumps(text), True


def _string_lengths(value: Any, into: list[int]) -> None:
    if isinstance(value, str):
        if len(value) > _NOTE_BYTES:
            into.append(len(value.encode()))
    elif isinstance(value, dict):
        for item in value.values():
            _string_lengths(item, into)
    elif isinstance(value, list):
        for item in value:
            _string_lengths(item, into)


def _common_length(lengths: list[int], excess: int) -> int | None:
    """The longest length ``L`` such that cutting every string longer than ``L`` to ``L`` bytes
    (each then gaining a note) saves ``excess`` bytes; None when no cut of strings can."""
    ordered = sorted(lengths, reverse=True)
    total = 0
    for count, length in enumerate(ordered, start=1):
        total += length
        limit = (total - count * _NOTE_BYTES - excess) // count
        following = ordered[count] if count < len(ordered) else 0
        if limit >= following:
            return limit if limit >= _NOTE_BYTES else None
    return None


def _cut_strings(value: Any, limit: int) -> Any:
    if isinstance(value, str):
        return _shortened(value, limit, kept=limit)
    if isinstance(value, dict):
        return {key: _cut_strings(item, limit) for key, item in value.items()}
    if isinstance(value, list):
        return [_cut_strings(item, limit) for item in value]
    return value
