"""CPU time per proxied request: steadier than req/s on a machine whose speed drifts.

    python bench/cpu.py [--duration 8] [--conns 16] [--mode json|stream] [--model bench|bench-per-request]
                        [--rounds 3] [--compare DIR ...]
    python bench/cpu.py --traces [--rounds 3]
    python bench/cpu.py --judges [--judge-cap N] [--rounds 3] [--duration 8]

Under the same wrk load, reads how much CPU each proxy process (and abproxy's embedded Redis)
used, from /proc, and divides by the requests wrk completed. ``--compare DIR`` adds abproxy run
from another checkout (e.g. a git worktree of an older commit), so a change is measured against
what it changed, on the same machine in the same minutes. ``--traces`` measures instead abproxy
writing 5% of its requests as MLflow traces (``trace_sample_rate: 0.05``, a flush every 5 s
laying the experiment out; the trace writer's process counted) against the same proxy with
tracing off (the cap is paced over the minute, so short runs see what a steady load pays). ``--judges`` measures abproxy with an LLM judge scoring
20% of the ``unit: user`` experiment's requests (``sample_rate: 0.2``, no per-minute cap, the
simulated judge model on the same fake upstream; ``--judge-cap`` sets its ``max_per_minute``)
against the same proxy with no judge: client
p50, p99 and req/s beside the CPU. Targets alternate within each round; the median over rounds is
printed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench_run  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and of its children that have exited."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(value) for value in fields[11:13]) / TICKS


def group_pids(leader: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getpgid(int(entry.name)) == leader:
                    found.append(int(entry.name))
            except ProcessLookupError:
                continue
    return found


def redis_pid(leader: int) -> int | None:
    for pid in group_pids(leader):
        try:
            if "redis-server" in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"):
                return pid
        except OSError:
            continue
    return None


JUDGE = """\
judges:
  quality:
    model: fake-judge
    prompt: "Rate the answer from 1 to 5. <question>{{input}}</question> <answer>{{output}}</answer> JSON: score, rationale"
    min: 1
    max: 5
    sample_rate: 0.2
    max_per_minute: CAP
"""


def start_abproxy(
    bench: bench_run.Bench, name: str, src: Path, port: int, trace_rate: float | None = None, judge_cap: int | None = None
) -> bench_run.Proc:
    """``trace_rate`` set: flushing to MLflow every 5 s (traces wait for the flush's layout) and
    sampling that share of requests as traces; ``judge_cap`` set: the ``bench`` experiment scored
    by :data:`JUDGE`, at most that many a minute."""
    data = bench.tmp / f"data-{name}"
    config = bench.tmp / f"config-{name}.yaml"
    text = (bench.tmp / "config.yaml").read_text().replace(f"{bench.tmp}/data", str(data))
    if judge_cap is not None:
        text = text.replace("experiments:\n", JUDGE.replace("CAP", str(judge_cap)) + "experiments:\n").replace(
            "    match: {model: bench}\n", "    match: {model: bench}\n    judges: [quality]\n"
        )
    if trace_rate is not None:
        text = text.replace(
            "flush_interval_s: 0, trace_sample_rate: 0", f"flush_interval_s: 5, trace_sample_rate: {trace_rate}"
        )
        text = text.replace(f"{bench.tmp}/mlflow.db", f"{bench.tmp}/mlflow-{name}.db")
    config.write_text(text)
    args = [sys.executable, "-m", "abproxy", "serve", "--config", str(config), "--host", "127.0.0.1", "--port", str(port)]
    proc = bench.spawn(name, args, src)
    bench_run.wait_http(f"http://127.0.0.1:{port}/v1/models", proc, 60)
    return proc


def proxy_cpu_seconds(leader: int, redis: int | None) -> dict[int, float]:
    """CPU of the proxy's processes: itself and its children (the MLflow trace writer), not Redis."""
    found = {}
    for pid in group_pids(leader):
        if pid != redis:
            try:
                found[pid] = cpu_seconds(pid)
            except OSError:
                continue
    return found


def measure(bench: bench_run.Bench, url: str, model: str, mode: str, conns: int, proc: bench_run.Proc) -> dict[str, float]:
    redis = redis_pid(proc.p.pid)
    proxy_before = proxy_cpu_seconds(proc.p.pid, redis)
    redis_before = cpu_seconds(redis) if redis else 0.0
    row = bench_run.run_wrk(url, bench.scripts[(model, mode)], conns, bench.duration)
    time.sleep(0.5)  # the recorder writes what the run left
    requests = row.get("requests") or 0
    if not requests:
        raise SystemExit(f"no requests completed against {url}: {row}")
    proxy_after = proxy_cpu_seconds(proc.p.pid, redis)
    proxy_us = sum(after - proxy_before.get(pid, 0.0) for pid, after in proxy_after.items()) / requests * 1e6
    redis_us = ((cpu_seconds(redis) - redis_before) / requests * 1e6) if redis else 0.0
    return {"proxy_us": proxy_us, "redis_us": redis_us, "rps": row["rps"], "p50_ms": row["p50_ms"], "p99_ms": row["p99_ms"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=8.0)
    ap.add_argument("--conns", type=int, default=16)
    ap.add_argument("--mode", choices=("json", "stream"), default="json")
    ap.add_argument("--model", choices=("bench", "bench-per-request"), default="bench",
                    help="the experiment: unit: user (default), or unit: request (requests carry a user)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--compare", nargs="*", default=[], type=Path, help="other checkouts to measure beside this one")
    ap.add_argument("--traces", action="store_true",
                    help="instead: abproxy flushing every 5 s with trace_sample_rate 0 against 0.05")
    ap.add_argument("--judges", action="store_true", help="instead: abproxy with no judge against a judge at sample_rate 0.2")
    ap.add_argument("--judge-cap", type=int, default=10_000_000, help="the judge's max_per_minute (default: no cap)")
    args = ap.parse_args()

    bench = bench_run.Bench(Path(tempfile.mkdtemp(prefix="abproxy-cpu-")), args.duration, 2.0)
    try:
        bench.start_upstream()
        lean_port = bench_run.free_port()
        lean = bench.start_passthrough("lean", lean_port)
        targets = {"passthrough-lean": (f"http://127.0.0.1:{lean_port}/v1/chat/completions", "gpt-4o-mini", lean)}
        runs: list[tuple[str, Path, float | None, int | None]] = [("abproxy", bench_run.ROOT, None, None)]
        runs += [(f"abproxy@{d.name}", d.resolve(), None, None) for d in args.compare]
        if args.traces:  # the same flushing on both sides: only the traces differ
            targets = {}
            runs = [("abproxy-flushing", bench_run.ROOT, 0.0, None), ("abproxy-traces-5%", bench_run.ROOT, 0.05, None)]
        if args.judges:
            targets = {}
            runs = [("abproxy-no-judge", bench_run.ROOT, None, None), ("abproxy-judge-20%", bench_run.ROOT, None, args.judge_cap)]
        for name, src, trace_rate, judge_cap in runs:
            port = bench_run.free_port()
            proc = start_abproxy(bench, name, src, port, trace_rate, judge_cap)
            targets[name] = (f"http://127.0.0.1:{port}/v1/chat/completions", args.model, proc)
        for url, model, _ in targets.values():
            bench_run.run_wrk(url, bench.scripts[(model, args.mode)], args.conns, 2.0)  # warm-up
        results: dict[str, list[dict[str, float]]] = {name: [] for name in targets}
        for round_number in range(1, args.rounds + 1):
            line = []
            for name, (url, model, proc) in targets.items():
                measured = measure(bench, url, model, args.mode, args.conns, proc)
                results[name].append(measured)
                line.append(
                    f"{name} {measured['proxy_us']:.0f}+{measured['redis_us']:.0f} µs {measured['rps']:,.0f}/s "
                    f"p50 {measured['p50_ms']:.2f} p99 {measured['p99_ms']:.2f} ms"
                )
            print(f"round {round_number}: " + "; ".join(line), flush=True)
        print(f"\nmedian CPU per request (proxy processes + its Redis), {args.conns} connections, {args.mode}, {args.model}:")
        for name, rows in results.items():
            proxy = statistics.median(r["proxy_us"] for r in rows)
            redis = statistics.median(r["redis_us"] for r in rows)
            rps, p50, p99 = (statistics.median(r[key] for r in rows) for key in ("rps", "p50_ms", "p99_ms"))
            print(f"  {name:22s} {proxy:6.1f} µs proxy + {redis:5.1f} µs Redis  ({rps:,.0f} req/s, p50 {p50:.2f} ms, p99 {p99:.2f} ms)")
    finally:
        for proc in reversed(bench.procs):
            proc.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
