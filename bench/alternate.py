"""Throughput ratios measured by alternation, for machines too noisy for one run per target.

    python bench/alternate.py [--rounds 3] [--duration 5] [--conns 16] [--mode json|stream]

Starts the fake upstream, both pass-throughs and abproxy at once (idle ones cost nothing), then
per round runs wrk against each in turn, pass-through first and last. Each abproxy figure is
divided by the mean of the two pass-through runs around it, so a slow spell of the machine hits
both sides of a ratio. Prints every round and the median ratio.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench_run  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per wrk run")
    ap.add_argument("--conns", type=int, default=16)
    ap.add_argument("--mode", choices=("json", "stream"), default="json")
    args = ap.parse_args()

    bench = bench_run.Bench(Path(tempfile.mkdtemp(prefix="abproxy-alternate-")), args.duration, 2.0)
    try:
        bench.start_upstream()
        lean_port = bench_run.free_port()
        bench.start_passthrough("aiohttp")
        bench.start_passthrough("lean", lean_port)
        bench.start_abproxy("abproxy")
        url = "http://127.0.0.1:{}/v1/chat/completions".format
        targets = {
            "passthrough": (url(bench.pt_port), "gpt-4o-mini"),
            "passthrough-lean": (url(lean_port), "gpt-4o-mini"),
            "abproxy": (url(bench.ab_port), "bench"),
            "abproxy-unit-request": (url(bench.ab_port), "bench-per-request"),
        }

        def rps(target: str, duration: float) -> float:
            address, model = targets[target]
            return bench_run.run_wrk(address, bench.scripts[(model, args.mode)], args.conns, duration)["rps"] or 0.0

        for target in targets:
            rps(target, 2.0)  # warm-up
        ratios: dict[str, list[float]] = {t: [] for t in targets if t != "passthrough"}
        for round_ in range(1, args.rounds + 1):
            before = rps("passthrough", args.duration)
            measured = {t: rps(t, args.duration) for t in ratios}
            after = rps("passthrough", args.duration)
            floor = (before + after) / 2
            for target, value in measured.items():
                ratios[target].append(value / floor)
            print(f"round {round_}: passthrough {before:,.0f} / {after:,.0f} req/s; "
                  + "; ".join(f"{t} {v:,.0f} ({v / floor:.2f}×)" for t, v in measured.items()), flush=True)
        print(f"\nmedian req/s vs the aiohttp pass-through, {args.conns} connections, {args.mode}:")
        for target, values in ratios.items():
            print(f"  {target:22s} {statistics.median(values):.2f}×  (rounds: {', '.join(f'{v:.2f}' for v in values)})")
    finally:
        for proc in list(bench.procs):
            proc.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
