"""What a trace keeps of a big request or answer (``abproxy.recording.trim``): the JSON's shape,
its longest strings cut to one length with a note of how long each was, and never much more than
the budget, whatever the body."""

from __future__ import annotations

import re

import orjson
import pytest

from abproxy.recording.trim import TRACED_BYTES, trimmed_json, trimmed_text

NOTE = re.compile(r" … \[abproxy: cut to its first ([\d,]+) of ([\d,]+) bytes\]$")


def cut_of(text: str) -> tuple[int, int]:
    """The kept and whole byte counts a note gives, checked against the text it ends."""
    match = NOTE.search(text)
    assert match is not None, text[-120:]
    kept, whole = (int(group.replace(",", "")) for group in match.groups())
    assert len(text[: match.start()].encode()) <= kept  # a character cut in two is dropped
    return kept, whole


def test_a_body_within_the_budget_is_kept_as_it_is() -> None:
    body = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "x" * 1000}]})
    assert trimmed_json(body, budget=2000) == (body, False)
    assert trimmed_text("y" * 2000, budget=2000) == ("y" * 2000, False)


def test_a_long_message_is_cut_and_the_rest_of_the_request_kept() -> None:
    system = "You are a translator with ten years of experience."
    body = orjson.dumps(
        {"model": "gpt-4o-mini", "temperature": 0.2, "messages": [{"role": "system", "content": system}, {"role": "user", "content": "y" * 3_000_000}]}
    )
    kept, cut = trimmed_json(body)
    assert cut and len(kept) <= TRACED_BYTES
    document = orjson.loads(kept)
    assert document["model"] == "gpt-4o-mini" and document["temperature"] == 0.2
    assert document["messages"][0] == {"role": "system", "content": system}
    user = document["messages"][1]["content"]
    assert user.startswith("yyyy") and cut_of(user)[1] == 3_000_000
    assert len(kept) > TRACED_BYTES - 200  # the budget is used, not wasted


def test_long_strings_are_cut_to_one_length_and_short_ones_left_alone() -> None:
    messages = [{"role": "user", "content": "a" * 900_000}, {"role": "assistant", "content": "b" * 700_000}, {"role": "user", "content": "c" * 2000}]
    kept, cut = trimmed_json(orjson.dumps({"messages": messages}))
    assert cut and len(kept) <= TRACED_BYTES
    first, second, third = (m["content"] for m in orjson.loads(kept)["messages"])
    assert cut_of(first)[0] == cut_of(second)[0] and cut_of(first)[1] == 900_000 and cut_of(second)[1] == 700_000
    assert third == "c" * 2000
    kept, _ = trimmed_json(orjson.dumps({"messages": [{"content": "a" * 900_000}, {"content": "b" * 400_000}]}))
    first, second = (m["content"] for m in orjson.loads(kept)["messages"])
    assert cut_of(first)[1] == 900_000 and second == "b" * 400_000  # only as much is cut as must be


def test_text_of_many_bytes_a_character_is_cut_on_a_character() -> None:
    korean = "안녕하세요 " * 300_000  # 16 bytes a word
    kept, cut = trimmed_json(orjson.dumps({"input": korean}))
    assert cut and len(kept) <= TRACED_BYTES
    text = orjson.loads(kept)["input"]  # valid UTF-8, or loads would fail
    assert text.startswith("안녕하세요") and cut_of(text)[1] == len(korean.encode())
    answer, cut = trimmed_text(korean)
    assert cut and len(answer.encode()) <= TRACED_BYTES and cut_of(answer)[1] == len(korean.encode())


@pytest.mark.parametrize(
    "body",
    [
        orjson.dumps({"model": "text-embedding-3-small", "input": list(range(400_000))}),  # token ids: all shape
        b"not json " * 200_000,
        b'{"messages": [' + b"x" * 2_000_000,  # cut off in the middle
    ],
    ids=["token-ids", "not-json", "broken-json"],
)
def test_a_body_that_no_cut_of_strings_makes_small_keeps_its_start_as_text(body: bytes) -> None:
    kept, cut = trimmed_json(body)
    assert cut and len(kept) <= TRACED_BYTES + 100
    text = orjson.loads(kept)
    assert isinstance(text, str) and body.decode().startswith(text[:1000]) and cut_of(text)[1] == len(body)
