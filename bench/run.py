"""One-command benchmark: fake upstream vs bare pass-through vs abproxy.

    python bench/run.py [--duration 8] [--quick] [--soak-requests 100000]

Starts (as subprocesses, each on a free port):
  * the fake upstream       python -m abproxy.simulation.fake_upstream --no-record
  * the bare pass-through   python bench/passthrough.py                 (Starlette + aiohttp)
  * the lean pass-through   python bench/passthrough.py --client lean   (pure ASGI + abproxy's client)
  * abproxy                 python -m abproxy serve --config <tmp yaml>   (embedded Redis)
then measures each target *sequentially* (2 cores: never concurrently):
  * wrk at 1, 16 and 64 connections, JSON, and at 16 and 64 connections, SSE streams;
  * time to first content token of streams at 1 and 16 connections (bench/ttft.py);
  * for abproxy: Redis commands per proxied request (INFO commandstats) and its RSS over a soak
    of --soak-requests requests;
and finally flush time as the number of experiments grows (bench/flush.py).
Prints markdown tables and writes bench/results.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"

CONFIG_TEMPLATE = """\
redis_url: ""
data_dir: {tmp}/data
mlflow: {{tracking_uri: "sqlite:///{tmp}/mlflow.db", flush_interval_s: 0, trace_sample_rate: 0}}
upstreams:
  fake: {{base_url: "http://127.0.0.1:{upstream_port}/v1", api_key: "", timeout_s: 30}}
default_upstream: fake
prices: {{gpt-4o-mini: {{input: 0.15, output: 0.6}}}}
experiments:
  bench:
    match: {{model: bench}}
    unit: user
    variants:
      a: {{model: gpt-4o-mini, system_prompt: "You are terse.", user_template: "Answer: {{{{input}}}}"}}
      b: {{model: gpt-4o-mini, system_prompt: "You are an expert with ten years of experience.", params: {{temperature: 0.2}}}}
  bench_per_request:
    match: {{model: bench-per-request}}
    unit: request
    variants:
      a: {{model: gpt-4o-mini, system_prompt: "You are terse.", user_template: "Answer: {{{{input}}}}"}}
      b: {{model: gpt-4o-mini, system_prompt: "You are an expert with ten years of experience.", params: {{temperature: 0.2}}}}
"""

LUA_TEMPLATE = """\
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local model = "{model}"
local tail = '{tail}'
local n = 0
request = function()
  n = n + 1
  local body = '{{"model":"' .. model .. '","user":"user-' .. (n % 1000) ..
    '","messages":[{{"role":"user","content":"What is the capital of France? Answer in one short sentence."}}]' ..
    tail .. '}}'
  return wrk.format(nil, nil, nil, body)
end
"""

# (conns, mode) wrk runs, in order, per target
FULL_RUNS = [(1, "json"), (16, "json"), (64, "json"), (16, "stream"), (64, "stream")]
RUNS = {
    "direct": FULL_RUNS,
    "passthrough": FULL_RUNS,
    "passthrough-lean": FULL_RUNS,
    "abproxy": FULL_RUNS,
    # the same proxy, an experiment randomised per request: no per-user sums to keep
    "abproxy-unit-request": [(16, "json"), (64, "json")],
}
TTFT_RUNS = [(1, 400), (16, 1600)]  # (conns, streams)
FLUSH_SIZES = [5, 20, 50]  # experiments of 5 variants each


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    def __init__(self, name: str, args: list[str], logdir: Path, src: Path = ROOT) -> None:
        """``src``: the checkout whose code the process runs."""
        self.name = name
        self.log_path = logdir / f"{name}.log"
        self._log = open(self.log_path, "wb")
        env = dict(os.environ)
        env["PYTHONPATH"] = str(src) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env.setdefault("PYTHONUNBUFFERED", "1")
        self.p = subprocess.Popen(
            args, cwd=src, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def alive(self) -> bool:
        return self.p.poll() is None

    def log_tail(self, n: int = 25) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def stop(self) -> None:
        if self.p.poll() is None:
            # the child leads its own session: this also reaches its children (e.g. embedded redis)
            for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 2.0)):
                try:
                    os.killpg(self.p.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.p.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        else:
            try:  # reap leftovers of an exited leader's group
                os.killpg(self.p.pid, signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                pass
        self._log.close()


def wait_http(url: str, proc: Proc, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited with code {proc.p.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                r.read()
            return
        except urllib.error.HTTPError:
            return  # it answers; status does not matter for readiness
        except (OSError, urllib.error.URLError) as e:
            last = e
        time.sleep(0.1)
    raise RuntimeError(f"{proc.name} did not answer {url} within {timeout:.0f}s ({last})")


def wait_tcp(port: int, proc: Proc, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited with code {proc.p.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{proc.name} did not accept connections within {timeout:.0f}s")


def sanity_check(url: str, model: str) -> str:
    body = json.dumps({"model": model, "user": "user-sanity",
                       "messages": [{"role": "user", "content": "What is the capital of France?"}]}).encode()
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            data = json.loads(r.read())
            return f"200 {data['choices'][0]['message']['content']!r}"
    except urllib.error.HTTPError as e:
        return f"HTTP {e.code}: {e.read()[:200]!r}"
    except Exception as e:  # noqa: BLE001
        return f"failed: {e!r}"


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def parse_wrk(out: str) -> dict:
    res: dict = {}
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    res["rps"] = float(m.group(1)) if m else None
    m = re.search(r"^\s*50%\s+([\d.]+)(us|ms|s|m)\s*$", out, re.M)
    res["p50_ms"] = float(m.group(1)) * _UNITS[m.group(2)] if m else None
    m = re.search(r"^\s*99%\s+([\d.]+)(us|ms|s|m)\s*$", out, re.M)
    res["p99_ms"] = float(m.group(1)) * _UNITS[m.group(2)] if m else None
    m = re.search(r"(\d+) requests in", out)
    res["requests"] = int(m.group(1)) if m else None
    errors = 0
    m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    if m:
        errors += int(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        errors += sum(int(x) for x in m.groups())
    res["errors"] = errors
    return res


def run_wrk(url: str, script: Path, conns: int, duration: float) -> dict:
    args = ["wrk", "-t1", f"-c{conns}", f"-d{max(1, round(duration))}s", "--timeout", "5s", "--latency",
            "-s", str(script), url]
    p = subprocess.run(args, capture_output=True, text=True, timeout=duration + 60)
    if p.returncode != 0:
        return {"rps": None, "p50_ms": None, "p99_ms": None, "errors": None, "error": p.stderr.strip()[-300:]}
    return parse_wrk(p.stdout)


def fmt(v, spec: str) -> str:
    return "–" if v is None else format(v, spec)


NOT_ROUND_TRIPS = {"get", "set", "hget", "hmget", "type", "hincrby", "hincrbyfloat", "hsetnx", "expire", "pexpire", "config", "info"}
"""Commands the recorder's batch script runs inside Redis, and the bench's own."""


def prepare_to_run() -> bool:
    """False (said on stderr) without wrk; else SIGTERM becomes KeyboardInterrupt, so a bench
    stopped either way shuts its processes down through its finally block."""
    if not shutil.which("wrk"):
        print("wrk not found (apt-get install wrk)", file=sys.stderr)
        return False

    def _term(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _term)
    return True


def redis_commands(url_file: Path) -> dict[str, int]:
    """``{command: calls}`` from the embedded Redis's INFO commandstats (the bench reads the URL
    file abproxy writes next to its data)."""
    import redis

    client = redis.Redis.from_url(url_file.read_text().strip())
    try:
        stats = client.info("commandstats")
    finally:
        client.close()
    return {name.removeprefix("cmdstat_"): int(value["calls"]) for name, value in stats.items()}


def reset_redis_stats(url_file: Path) -> None:
    import redis

    client = redis.Redis.from_url(url_file.read_text().strip())
    try:
        client.config_resetstat()
    finally:
        client.close()


def rss_mb(proc: Proc) -> float:
    import psutil

    return psutil.Process(proc.p.pid).memory_info().rss / 2**20


class Bench:
    """The processes and files of one benchmark run."""

    def __init__(self, tmp: Path, duration: float, warmup: float):
        self.tmp = tmp
        self.duration = duration
        self.warmup = warmup
        self.procs: list[Proc] = []
        self.rows: list[dict] = []
        self.notes: list[str] = []
        self.up_port, self.pt_port, self.ab_port = free_port(), free_port(), free_port()
        self.scripts: dict[tuple[str, str], Path] = {}
        for model in ("gpt-4o-mini", "bench", "bench-per-request"):
            for mode in ("json", "stream"):
                path = tmp / f"{model}-{mode}.lua"
                path.write_text(LUA_TEMPLATE.format(model=model, tail=',"stream":true' if mode == "stream" else ""))
                self.scripts[(model, mode)] = path
        (tmp / "config.yaml").write_text(CONFIG_TEMPLATE.format(tmp=tmp, upstream_port=self.up_port))

    def spawn(self, name: str, args: list[str], src: Path = ROOT) -> Proc:
        proc = Proc(name, args, self.tmp, src)
        self.procs.append(proc)
        return proc

    def retire(self, proc: Proc) -> None:
        proc.stop()
        self.procs.remove(proc)

    def start_upstream(self) -> Proc:
        proc = self.spawn("upstream", [sys.executable, "-m", "abproxy.simulation.fake_upstream", "--host", "127.0.0.1",
                                       "--port", str(self.up_port), "--no-record"])
        wait_http(f"http://127.0.0.1:{self.up_port}/v1/models", proc, 20)
        return proc

    def start_passthrough(self, client: str = "aiohttp", port: int | None = None) -> Proc:
        port = port or self.pt_port
        proc = self.spawn(f"passthrough-{client}", [sys.executable, str(BENCH / "passthrough.py"), "--client", client, "--upstream",
                                          f"http://127.0.0.1:{self.up_port}/v1", "--port", str(port)])
        wait_tcp(port, proc, 20)
        return proc

    def start_abproxy(self, name: str) -> Proc:
        shutil.rmtree(self.tmp / "data", ignore_errors=True)  # a fresh embedded Redis each time
        proc = self.spawn(name, [sys.executable, "-m", "abproxy", "serve", "--config", str(self.tmp / "config.yaml"),
                                 "--host", "127.0.0.1", "--port", str(self.ab_port)])
        wait_http(f"http://127.0.0.1:{self.ab_port}/v1/models", proc, 60)
        return proc

    @property
    def redis_url_file(self) -> Path:
        return self.tmp / "data" / "redis" / "url"

    def wrk(self, target: str, url: str, model: str, conns: int, mode: str, proc: Proc | None) -> dict:
        row = {"target": target, "conns": conns, "mode": mode}
        if proc is not None and not proc.alive():
            row.update(rps=None, p50_ms=None, p99_ms=None, errors=None, failed="process died")
        else:
            row.update(run_wrk(url, self.scripts[(model, mode)], conns, self.duration))
            if row.get("error"):
                row["failed"] = row.pop("error")
        print(f"  {target:20s} c={conns:<3d} {mode:6s} req/s={fmt(row.get('rps'), '.0f'):>8s} "
              f"p50={fmt(row.get('p50_ms'), '.3f')}ms errors={row.get('errors')}", flush=True)
        self.rows.append(row)
        return row


def measure_target(bench: Bench, name: str, url: str, model: str, proc: Proc | None) -> dict:
    """wrk runs and TTFT for one target; for abproxy also Redis commands per request."""
    extra: dict = {}
    check = sanity_check(url, model)
    print(f"[{name}] ready; sanity request -> {check}", flush=True)
    if not check.startswith("200"):
        bench.notes.append(f"{name}: sanity request returned {check}")
    if bench.warmup > 0:
        run_wrk(url, bench.scripts[(model, "json")], 16, bench.warmup)
    measuring_redis = name == "abproxy"
    for conns, mode in RUNS[name]:
        if measuring_redis and (conns, mode) == (16, "json"):
            time.sleep(0.5)  # let the recorder write what the earlier runs left
            reset_redis_stats(bench.redis_url_file)
        row = bench.wrk(name, url, model, conns, mode, proc)
        if measuring_redis and (conns, mode) == (16, "json") and row.get("requests"):
            time.sleep(0.6)  # two recorder intervals: the run's last batch is written
            calls = redis_commands(bench.redis_url_file)
            extra["redis"] = {
                "requests": row["requests"],
                "evalsha_per_request": calls.get("evalsha", 0) / row["requests"],
                "round_trips_per_request": sum(v for k, v in calls.items() if k not in NOT_ROUND_TRIPS) / row["requests"],
                "commands_incl_script_per_request": sum(calls.values()) / row["requests"],
                "calls": calls,
            }
    if name in ("direct", "passthrough", "passthrough-lean", "abproxy"):
        from ttft import measure as measure_ttft

        extra["ttft"] = {}
        for conns, streams in TTFT_RUNS:
            result = asyncio.run(measure_ttft(url, model, conns, streams))
            extra["ttft"][conns] = result
            print(f"  {name:20s} c={conns:<3d} TTFT p50={result['p50_ms']:.3f}ms p99={result['p99_ms']:.3f}ms", flush=True)
    return extra


def soak(bench: Bench, requests: int) -> dict:
    """abproxy's RSS after a warm-up and over ``requests`` more requests (JSON, 16 connections)."""
    proc = bench.start_abproxy("abproxy-soak")
    url = f"http://127.0.0.1:{bench.ab_port}/v1/chat/completions"
    script = bench.scripts[("bench", "json")]
    run_wrk(url, script, 16, max(bench.warmup, 4.0))
    samples = [rss_mb(proc)]
    served = 0
    while served < requests and proc.alive():
        result = run_wrk(url, script, 16, 5.0)
        served += result.get("requests") or 0
        samples.append(rss_mb(proc))
    bench.retire(proc)
    growth = (samples[-1] - samples[0]) / samples[0]
    print(f"  soak: {served:,} requests, RSS {samples[0]:.1f} → {samples[-1]:.1f} MB "
          f"(max {max(samples):.1f}, {growth:+.1%})", flush=True)
    return {"requests": served, "rss_mb": samples, "growth": growth}


def flush_scaling() -> dict[int, dict[str, float]]:
    from flush import measure as measure_flush

    timings = {}
    for experiments in FLUSH_SIZES:
        timings[experiments] = asyncio.run(measure_flush(experiments, 5, 200, quiet=True))
        print(f"  flush {experiments:>3d} experiments × 5 variants: first {timings[experiments]['first']:.2f} s, "
              f"steady {timings[experiments]['steady']:.2f} s", flush=True)
    return timings


def throughput_table(rows: list[dict]) -> list[str]:
    def find(target, conns, mode):
        return next((r for r in rows if (r["target"], r["conns"], r["mode"]) == (target, conns, mode)), None)

    for r in rows:
        pt = find("passthrough", r["conns"], r["mode"])
        lean = find("passthrough-lean", r["conns"], r["mode"])
        r["vs_passthrough_lean"] = (r["rps"] / lean["rps"]) if (r.get("rps") and lean and lean.get("rps")) else None
        d = find("direct", r["conns"], r["mode"])
        r["vs_passthrough"] = (r["rps"] / pt["rps"]) if (r.get("rps") and pt and pt.get("rps")) else None
        r["added_p50_ms"] = (r["p50_ms"] - d["p50_ms"]) if (r.get("p50_ms") is not None and d
                                                             and d.get("p50_ms") is not None) else None
    lines = [
        "| target | conns | mode | req/s | p50 ms | req/s vs passthrough | req/s vs passthrough-lean | added p50 vs direct (ms) | errors |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(rows, key=lambda r: (r["mode"], r["conns"])):
        if r.get("failed"):
            lines.append(f"| {r['target']} | {r['conns']} | {r['mode']} | FAILED | – | – | – | – | – |")
            continue
        lines.append(
            f"| {r['target']} | {r['conns']} | {r['mode']} | {fmt(r['rps'], ',.0f')} | {fmt(r['p50_ms'], '.3f')} | "
            f"{fmt(r['vs_passthrough'], '.2f')}× | {fmt(r['vs_passthrough_lean'], '.2f')}× | "
            f"{fmt(r['added_p50_ms'], '+.3f')} | {r.get('errors')} |"
        )
    return lines


def ttft_table(extras: dict[str, dict]) -> list[str]:
    lines = ["| target | conns | TTFT p50 ms | TTFT p99 ms | added p50 vs direct (ms) |", "|---|---:|---:|---:|---:|"]
    direct = extras.get("direct", {}).get("ttft", {})
    for target in ("direct", "passthrough", "passthrough-lean", "abproxy"):
        for conns, result in extras.get(target, {}).get("ttft", {}).items():
            base = direct.get(conns)
            added = result["p50_ms"] - base["p50_ms"] if base else None
            lines.append(f"| {target} | {conns} | {result['p50_ms']:.3f} | {result['p99_ms']:.3f} | {fmt(added, '+.3f')} |")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=8.0, help="seconds per wrk run (default 8)")
    ap.add_argument("--quick", action="store_true", help="3 s per run, a 20,000-request soak, no flush scaling")
    ap.add_argument("--warmup", type=float, default=2.0, help="warm-up seconds per target (default 2)")
    ap.add_argument("--soak-requests", type=int, default=100_000)
    ap.add_argument("--out", default=str(BENCH / "results.json"))
    args = ap.parse_args()
    duration = 3.0 if args.quick else args.duration
    soak_requests = 20_000 if args.quick else args.soak_requests

    if not prepare_to_run():
        return 2
    sys.path.insert(0, str(BENCH))

    tmp = Path(tempfile.mkdtemp(prefix="abproxy-bench-"))
    bench = Bench(tmp, duration, args.warmup)
    extras: dict[str, dict] = {}
    try:
        upstream = bench.start_upstream()
        targets = [
            ("direct", f"http://127.0.0.1:{bench.up_port}/v1/chat/completions", "gpt-4o-mini"),
            ("passthrough", f"http://127.0.0.1:{bench.pt_port}/v1/chat/completions", "gpt-4o-mini"),
            ("passthrough-lean", f"http://127.0.0.1:{bench.pt_port}/v1/chat/completions", "gpt-4o-mini"),
            ("abproxy", f"http://127.0.0.1:{bench.ab_port}/v1/chat/completions", "bench"),
            ("abproxy-unit-request", f"http://127.0.0.1:{bench.ab_port}/v1/chat/completions", "bench-per-request"),
        ]
        for name, url, model in targets:
            try:
                if name == "direct":
                    proc = upstream
                elif name.startswith("passthrough"):
                    proc = bench.start_passthrough("lean" if name == "passthrough-lean" else "aiohttp")
                else:
                    proc = bench.start_abproxy(name)
            except RuntimeError as e:
                print(f"[{name}] FAILED to start: {e}", flush=True)
                bench.notes.append(f"{name}: failed to start: {e}")
                continue
            extras[name] = measure_target(bench, name, url, model, proc)
            if proc is not upstream:
                bench.retire(proc)  # free the CPU for the next target
        soak_result = soak(bench, soak_requests)
        for proc in list(bench.procs):
            bench.retire(proc)
        flush_result = {} if args.quick else flush_scaling()
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    finally:
        for p in reversed(bench.procs):
            p.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    lines = [f"wrk -t1, {duration:.0f}s per run, {os.cpu_count()} CPUs, Python {platform.python_version()}", ""]
    lines += throughput_table(bench.rows)
    lines += ["", "Time to first token (bench/ttft.py, streams):", ""] + ttft_table(extras)
    redis_figures = extras.get("abproxy", {}).get("redis")
    if redis_figures:
        lines += ["", f"Redis, abproxy 16 conns JSON ({redis_figures['requests']:,} requests): "
                      f"{redis_figures['round_trips_per_request']:.4f} round trips per request "
                      f"({redis_figures['evalsha_per_request']:.4f} EVALSHA), "
                      f"{redis_figures['commands_incl_script_per_request']:.2f} commands per request counting those inside scripts"]
    lines += ["", f"RSS over {soak_result['requests']:,} requests: {soak_result['rss_mb'][0]:.1f} → "
                  f"{soak_result['rss_mb'][-1]:.1f} MB ({soak_result['growth']:+.1%}), max {max(soak_result['rss_mb']):.1f} MB"]
    for experiments, t in flush_result.items():
        lines.append(f"Flush, {experiments} experiments × 5 variants: first {t['first']:.2f} s, steady state {t['steady']:.2f} s")
    print()
    print("\n".join(lines))
    for n in bench.notes:
        print(f"note: {n}")

    out = {
        "meta": {
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "duration_s": duration,
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "wrk_threads": 1,
        },
        "rows": bench.rows,
        "extras": extras,
        "soak": soak_result,
        "flush": flush_result,
        "notes": bench.notes,
    }
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
