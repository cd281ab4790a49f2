"""An app behind abproxy: asks for a translation, shows it, and posts the user's rating.

    ABPROXY_BASE_URL=http://127.0.0.1:8080/v1 OPENAI_API_KEY=sk-... python examples/app_with_feedback.py

Nothing here knows about variants: the proxy picks one per user (sticky), and the rating is
joined to the response by the X-ABProxy-Request-Id header.
"""

from __future__ import annotations

import os
import random

from openai import OpenAI

client = OpenAI(base_url=os.environ.get("ABPROXY_BASE_URL", "http://127.0.0.1:8080/v1"))


def translate(user_id: str, sentence: str) -> tuple[str, str, str]:
    """The translation, the proxy's request id and the variant that served it."""
    raw = client.chat.completions.with_raw_response.create(
        model="translation",  # the experiment's match.model
        messages=[{"role": "user", "content": sentence}],
        user=user_id,  # the unit: this user always gets the same variant
    )
    completion = raw.parse()
    return completion.choices[0].message.content or "", raw.headers["X-ABProxy-Request-Id"], raw.headers["X-ABProxy-Variant"]


def rate(request_id: str, score: int) -> dict:
    """Post a 1..5 satisfaction score; posting again for the same request replaces it."""
    return client.post("/feedback", body={"request_id": request_id, "name": "satisfaction", "score": score}, cast_to=object)


if __name__ == "__main__":
    for user in ("alice", "bob", "chloe"):
        text, request_id, variant = translate(user, "The weather is lovely today.")
        print(f"{user}: [{variant}] {text}")
        print("   feedback:", rate(request_id, random.randint(3, 5)))
