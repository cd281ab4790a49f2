"""Time to first token as a client sees it: wrk cannot tell when the first content chunk of a
stream arrives, so this small aiohttp client does.

    python bench/ttft.py --url http://127.0.0.1:9000/v1/chat/completions [--model bench] [--conns 1]

Each request is a streaming chat completion; TTFT is the time from sending it to the first SSE
event that carries content. Prints p50/p99 in milliseconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import aiohttp


def _request_body(model: str, user: int) -> bytes:
    return json.dumps(
        {
            "model": model,
            "user": f"user-{user % 1000}",
            "stream": True,
            "messages": [{"role": "user", "content": "What is the capital of France? Answer in one short sentence."}],
        }
    ).encode()


async def _one(session: aiohttp.ClientSession, url: str, body: bytes) -> float:
    started = time.perf_counter()
    first: float | None = None
    async with session.post(url, data=body, headers={"content-type": "application/json"}) as response:
        response.raise_for_status()
        async for line in response.content:
            if first is None and line.startswith(b"data: {") and b'"content":"' in line and b'"content":""' not in line:
                first = time.perf_counter()
    if first is None:
        raise RuntimeError("the stream carried no content")
    return first - started


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def measure(url: str, model: str, conns: int, requests: int, warmup: int = 50) -> dict[str, float]:
    """p50 and p99 TTFT in ms over ``requests`` streams, ``conns`` at a time."""
    connector = aiohttp.TCPConnector(limit=conns)
    async with aiohttp.ClientSession(connector=connector) as session:
        for i in range(warmup):
            await _one(session, url, _request_body(model, i))
        samples: list[float] = []
        counter = iter(range(requests))

        async def worker() -> None:
            for i in counter:
                samples.append(await _one(session, url, _request_body(model, i)))

        await asyncio.gather(*(worker() for _ in range(conns)))
    return {
        "requests": len(samples),
        "p50_ms": _percentile(samples, 0.50) * 1000,
        "p99_ms": _percentile(samples, 0.99) * 1000,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--model", default="gpt-4o-mini")
    parser.add_argument("--conns", type=int, default=1)
    parser.add_argument("--requests", type=int, default=500)
    args = parser.parse_args()
    result = asyncio.run(measure(args.url, args.model, args.conns, args.requests))
    print(f"TTFT over {result['requests']} streams: p50 {result['p50_ms']:.3f} ms, p99 {result['p99_ms']:.3f} ms")


if __name__ == "__main__":
    main()
