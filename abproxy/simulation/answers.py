"""What the demo's simulated model answers: it follows the instruction it finds in the prompt as
sent upstream (the variant applied), so that each variant's answers differ the way a reader, or
an LLM judge, can see: three bullet points are three sentences, a short paragraph one or two. It
never sees the variant's name; it reads the prompt, as a model would."""

from __future__ import annotations

import random
import re
from typing import Any

_CLAUSES = re.compile(r",\s+(?:and\s+)?|\s+and\s+|\s+while\s+")


def _last_user(messages: Any) -> tuple[str, str]:
    """(the system prompt, the last user message) of a chat request."""
    system, user = "", ""
    for message in messages if isinstance(messages, list) else ():
        if isinstance(message, dict) and isinstance(message.get("content"), str):
            if message.get("role") == "system":
                system = message["content"]
            elif message.get("role") == "user":
                user = message["content"]
    return system, user


def _clauses(text: str) -> list[str]:
    return [clause.strip().rstrip(".?!") for clause in _CLAUSES.split(text) if clause.strip().rstrip(".?!")]


def simulated_answer(request: dict[str, Any], rng: random.Random) -> str | None:
    """The answer to a chat request, by the instruction in its prompt; None for a prompt this
    model does not know (the fake upstream then echoes it)."""
    system, prompt = _last_user(request.get("messages"))
    lowered = f"{system} {prompt}".lower()
    # the text the instruction is about: after its last line break, else after a colon
    subject = prompt.rpartition("\n")[2] if "\n" in prompt else prompt.partition(":")[2] or prompt
    subject = subject.strip()
    if not subject:
        return None
    clauses = _clauses(subject)
    if "bullet points" in lowered:
        bullets = 3 if rng.random() < 0.7 else 2  # now and then two points run together
        return "\n".join(f"- {clause[0].upper()}{clause[1:]}." for clause in clauses[:bullets])
    if "summarize" in lowered:
        extra = f" It also mentions this: {clauses[1]}." if len(clauses) > 1 and rng.random() < 0.5 else ""
        return f"In short, {clauses[0][0].lower()}{clauses[0][1:]}.{extra}"
    if "positive, negative or neutral" in lowered:
        label = rng.choice(("positive", "negative", "neutral"))
        return f"Tone and wording point one way. {label.capitalize()}." if "step by step" in lowered else label
    if "korean" in lowered:
        romanised = " ".join(f"{word[:3].lower()}-yo" for word in subject.split()[:6])
        if "step by step" in lowered:
            phrases = "; ".join(clauses)
            return f"Key phrases: {phrases}. Each phrase translated in turn. Final sentence: {romanised}."
        return f"{romanised}."
    return None
