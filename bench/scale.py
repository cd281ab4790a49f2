"""Scale-out: abproxy replicas × Redis (one server or a cluster), proxied JSON throughput.

    python bench/scale.py [--duration 8] [--rounds 3] [--conns 16]

Starts the fake upstream, one standalone redis-server (AOF, as the embedded one) and a loopback
Redis Cluster of 3 masters with 1 replica each (tests/clusterkit.py, as bench/cluster_wait.py),
then two abproxy replicas on each (`redis_url` pointing at the server, or at a cluster node).
Four setups are measured:

  * 1 replica, one Redis        * 2 replicas, one Redis
  * 1 replica, Redis Cluster    * 2 replicas, Redis Cluster

Each replica gets its own wrk (`-t1`, `--conns` connections, JSON): with two replicas both wrk
processes run at the same time and their req/s are summed — the load a second replica exists to
take, and what contends for Redis. Requests rotate over three `unit: user` experiments whose hash
tags fall on three different cluster masters (`bench`, `bench_c`, `bench_d`; `user` over 1000 ids).
Setups alternate within each round; the median over rounds is printed, as a markdown table of
req/s, the ratio to "1 replica, one Redis", and the proxy's and Redis's CPU per request (from
/proc; every redis-server of the setup, the cluster's replicas included). About 2.5 minutes at
the defaults. On a machine with few cores, wrk, the upstream, the replicas and every Redis process
share them: read the table as cluster mode's overhead, not as scale-out.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import run as bench_run
from clusterkit import RedisCluster
from cpu import cpu_seconds, group_pids

from abproxy.recording.embedded_redis import EmbeddedRedis

# run.py's two experiments both hash to the first master ({bench} slot 2933, {bench_per_request}
# 4328): with them alone every write would go to one master. Two more `unit: user` experiments
# put one experiment on each master of clusterkit's layout (slots split in thirds):
# {bench} 2933, {bench_d} 7155, {bench_c} 11028. `bench_per_request` stays in the config, unused.
EXTRA_EXPERIMENTS = """\
  bench_c:
    match: {{model: bench-c}}
    unit: user
    variants:
      a: {{model: gpt-4o-mini, system_prompt: "You are terse."}}
      b: {{model: gpt-4o-mini, system_prompt: "You are an expert.", params: {{temperature: 0.2}}}}
  bench_d:
    match: {{model: bench-d}}
    unit: user
    variants:
      a: {{model: gpt-4o-mini, system_prompt: "You are terse."}}
      b: {{model: gpt-4o-mini, system_prompt: "You are an expert.", params: {{temperature: 0.2}}}}
"""
MODELS = ("bench", "bench-c", "bench-d")
EXPERIMENTS = ("bench", "bench_c", "bench_d")

LUA = """\
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local models = {"bench", "bench-c", "bench-d"}
local n = 0
request = function()
  n = n + 1
  local body = '{"model":"' .. models[(n % 3) + 1] .. '","user":"user-' .. (n % 1000) ..
    '","messages":[{"role":"user","content":"What is the capital of France? Answer in one short sentence."}]}'
  return wrk.format(nil, nil, nil, body)
end
"""

SETUPS = [  # (label, replicas, redis)
    ("1 replica, one Redis", 1, "single"),
    ("2 replicas, one Redis", 2, "single"),
    ("1 replica, Redis Cluster (3 masters + 3 replicas)", 1, "cluster"),
    ("2 replicas, Redis Cluster (3 masters + 3 replicas)", 2, "cluster"),
]


def start_replica(bench: bench_run.Bench, name: str, redis_url: str) -> tuple[bench_run.Proc, str]:
    config = bench.tmp / f"config-{name}.yaml"
    text = bench_run.CONFIG_TEMPLATE.format(tmp=bench.tmp, upstream_port=bench.up_port) + EXTRA_EXPERIMENTS.format()
    text = text.replace('redis_url: ""', f'redis_url: "{redis_url}"').replace(
        f"{bench.tmp}/data", f"{bench.tmp}/data-{name}"
    )
    config.write_text(text)
    port = bench_run.free_port()
    proc = bench.spawn(
        name,
        [sys.executable, "-m", "abproxy", "serve", "--config", str(config), "--host", "127.0.0.1", "--port", str(port)],
    )
    bench_run.wait_http(f"http://127.0.0.1:{port}/v1/models", proc, 60)
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    for model in MODELS:
        check = bench_run.sanity_check(url, model)
        if not check.startswith("200"):
            raise RuntimeError(f"{name}: sanity request ({model}) returned {check}")
    return proc, url


def group_cpu(leaders: list[int]) -> float:
    total = 0.0
    for leader in leaders:
        for pid in group_pids(leader):
            try:
                total += cpu_seconds(pid)
            except OSError:
                continue
    return total


def pids_cpu(pids: list[int]) -> float:
    return sum(cpu_seconds(pid) for pid in pids)


def drive(urls: list[str], script: Path, conns: int, duration: float) -> list[dict]:
    """One wrk per replica, all at once."""
    with concurrent.futures.ThreadPoolExecutor(len(urls)) as pool:
        return list(pool.map(lambda url: bench_run.run_wrk(url, script, conns, duration), urls))


def evals_per_master(cluster: RedisCluster) -> dict[int, int]:
    calls = {}
    for node in cluster.nodes:
        client = node.client()
        try:
            if client.info("replication")["role"] != "master":
                continue
            stats = client.info("commandstats")
            calls[node.port] = sum(
                int(v["calls"]) for k, v in stats.items() if k in ("cmdstat_evalsha", "cmdstat_eval")
            )
        finally:
            client.close()
    return calls


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=8.0, help="seconds per wrk run (default 8)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--conns", type=int, default=16, help="wrk connections per replica (default 16)")
    args = ap.parse_args()
    if not bench_run.prepare_to_run():
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="abproxy-scale-"))
    bench = bench_run.Bench(tmp, args.duration, 2.0)
    script = tmp / "scale.lua"
    script.write_text(LUA)
    single = EmbeddedRedis(tmp / "redis-single", password="")
    cluster = RedisCluster(tmp / "cluster")
    results: dict[str, list[dict]] = {label: [] for label, _, _ in SETUPS}
    try:
        bench.start_upstream()
        single.start()
        cluster.start()
        placement = {e: cluster.master_of(f"abproxy:{{{e}}}:x").port for e in EXPERIMENTS}
        print(
            "cluster masters of the experiments: " + ", ".join(f"{e} → :{p}" for e, p in placement.items()), flush=True
        )
        replicas = {
            "single": [start_replica(bench, f"single-{i}", single.url) for i in (1, 2)],
            "cluster": [start_replica(bench, f"cluster-{i}", cluster.url) for i in (1, 2)],
        }
        redis_pids = {
            "single": [single._process.pid],
            "cluster": [node.process.pid for node in cluster.nodes if node.process],
        }
        for kind in ("single", "cluster"):  # warm-up, both replicas
            drive([url for _, url in replicas[kind]], script, args.conns, bench.warmup)
        time.sleep(0.5)
        evals_before = evals_per_master(cluster)
        for round_number in range(1, args.rounds + 1):
            line = []
            for label, count, kind in SETUPS:
                used = replicas[kind][:count]
                leaders = [proc.p.pid for proc, _ in used]
                proxy_before, redis_before = group_cpu(leaders), pids_cpu(redis_pids[kind])
                rows = drive([url for _, url in used], script, args.conns, args.duration)
                time.sleep(0.5)  # the recorders write what the run left
                proxy_cpu = group_cpu(leaders) - proxy_before
                redis_cpu = pids_cpu(redis_pids[kind]) - redis_before
                if any(not r.get("requests") for r in rows) or not all(proc.alive() for proc, _ in used):
                    raise RuntimeError(f"{label}: a wrk run failed or a replica died: {rows}")
                requests = sum(r["requests"] for r in rows)
                measured = {
                    "rps": sum(r["rps"] for r in rows),
                    "p50_ms": statistics.mean(r["p50_ms"] for r in rows),
                    "errors": sum(r["errors"] for r in rows),
                    "proxy_us": proxy_cpu / requests * 1e6,
                    "redis_us": redis_cpu / requests * 1e6,
                }
                results[label].append(measured)
                line.append(f"{label.split(' (')[0]}: {measured['rps']:,.0f}/s")
            print(f"round {round_number}: " + "; ".join(line), flush=True)
        evals_after = evals_per_master(cluster)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    finally:
        for proc in reversed(bench.procs):
            proc.stop()
        cluster.stop()
        single.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    base = statistics.median(r["rps"] for r in results[SETUPS[0][0]])
    lines = [
        (
            f"wrk -t1 -c{args.conns} per replica (two at once for 2 replicas, req/s summed), JSON, {args.duration:.0f} s runs, "
            f"median of {args.rounds} rounds; {os.cpu_count()} CPUs, Python {platform.python_version()}"
        ),
        "",
        "| setup | req/s | vs 1 replica, one Redis | p50 ms | proxy CPU µs/req | Redis CPU µs/req | errors |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for label, _, _ in SETUPS:
        rows = results[label]
        med = {key: statistics.median(r[key] for r in rows) for key in ("rps", "p50_ms", "proxy_us", "redis_us")}
        lines.append(
            f"| {label} | {med['rps']:,.0f} | {med['rps'] / base:.2f}× | {med['p50_ms']:.2f} | "
            f"{med['proxy_us']:.0f} | {med['redis_us']:.0f} | {sum(r['errors'] for r in rows)} |"
        )
    scripts = {port: evals_after.get(port, 0) - evals_before.get(port, 0) for port in evals_after}
    lines += [
        "",
        "Recorder script calls per cluster master over the measured runs: "
        + ", ".join(f":{port} {calls:,}" for port, calls in sorted(scripts.items())),
    ]
    print()
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
