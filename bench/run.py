"""One-command benchmark: fake upstream vs bare pass-through vs abproxy.

    python bench/run.py [--duration 10] [--quick]

Starts (as subprocesses, each on a free port):
  * the fake upstream       python -m abproxy.fake_upstream --no-record
  * the bare pass-through   python bench/passthrough.py
  * abproxy                 python -m abproxy serve --config <tmp yaml>
then runs wrk against each target *sequentially* (2 cores: never concurrently):
16 connections non-streaming, 1 connection non-streaming, 16 connections streaming.
Prints a markdown table and writes bench/results.json.
"""

from __future__ import annotations

import argparse
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
mlflow: {{tracking_uri: "sqlite:///{tmp}/mlflow.db", flush_interval_s: 0}}
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

# (conns, mode) runs, in order, for every target
RUNS = [(16, "json"), (1, "json"), (16, "stream")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    def __init__(self, name: str, args: list[str], logdir: Path) -> None:
        self.name = name
        self.log_path = logdir / f"{name}.log"
        self._log = open(self.log_path, "wb")
        env = dict(os.environ)
        env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env.setdefault("PYTHONUNBUFFERED", "1")
        self.p = subprocess.Popen(
            args, cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per wrk run (default 10)")
    ap.add_argument("--quick", action="store_true", help="3 s per run")
    ap.add_argument("--warmup", type=float, default=2.0, help="warm-up seconds per target (default 2)")
    ap.add_argument("--out", default=str(BENCH / "results.json"))
    args = ap.parse_args()
    duration = 3.0 if args.quick else args.duration

    if not shutil.which("wrk"):
        print("wrk not found (apt-get install wrk)", file=sys.stderr)
        return 2

    # Ctrl-C / SIGTERM -> clean shutdown through the finally block
    def _term(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _term)

    tmp = Path(tempfile.mkdtemp(prefix="abproxy-bench-"))
    procs: list[Proc] = []
    rows: list[dict] = []
    notes: list[str] = []
    try:
        up_port, pt_port, ab_port = free_port(), free_port(), free_port()
        scripts = {}
        for model in ("gpt-4o-mini", "bench", "bench-per-request"):
            for mode in ("json", "stream"):
                path = tmp / f"{model}-{mode}.lua"
                path.write_text(LUA_TEMPLATE.format(model=model, tail=',"stream":true' if mode == "stream" else ""))
                scripts[(model, mode)] = path
        (tmp / "config.yaml").write_text(CONFIG_TEMPLATE.format(tmp=tmp, upstream_port=up_port))

        py = sys.executable
        upstream = Proc("upstream", [py, "-m", "abproxy.fake_upstream", "--host", "127.0.0.1",
                                     "--port", str(up_port), "--no-record"], tmp)
        procs.append(upstream)
        wait_http(f"http://127.0.0.1:{up_port}/v1/models", upstream, 20)

        targets = [
            # name, process, url, model
            ("direct", upstream, f"http://127.0.0.1:{up_port}/v1/chat/completions", "gpt-4o-mini"),
            ("passthrough", None, f"http://127.0.0.1:{pt_port}/v1/chat/completions", "gpt-4o-mini"),
            ("abproxy", None, f"http://127.0.0.1:{ab_port}/v1/chat/completions", "bench"),
            # the same proxy, an experiment randomised per request: no per-user sums to keep
            ("abproxy-unit-request", None, f"http://127.0.0.1:{ab_port}/v1/chat/completions", "bench-per-request"),
        ]

        for i, (name, proc, url, model) in enumerate(targets):
            failed = None
            if name == "passthrough":
                proc = Proc("passthrough", [py, str(BENCH / "passthrough.py"), "--upstream",
                                            f"http://127.0.0.1:{up_port}/v1", "--port", str(pt_port)], tmp)
                procs.append(proc)
                try:
                    wait_tcp(pt_port, proc, 20)
                except RuntimeError as e:
                    failed = str(e)
            elif name.startswith("abproxy"):
                proc = Proc(name, [py, "-m", "abproxy", "serve", "--config", str(tmp / "config.yaml"),
                                        "--host", "127.0.0.1", "--port", str(ab_port)], tmp)
                procs.append(proc)
                try:
                    wait_http(f"http://127.0.0.1:{ab_port}/v1/models", proc, 60)
                except RuntimeError as e:
                    failed = str(e)

            if failed is None:
                check = sanity_check(url, model)
                print(f"[{name}] ready; sanity request -> {check}", flush=True)
                if not check.startswith("200"):
                    notes.append(f"{name}: sanity request returned {check}")
                if args.warmup > 0:
                    run_wrk(url, scripts[(model, "json")], 16, args.warmup)
            else:
                print(f"[{name}] FAILED to start: {failed}", flush=True)
                tail = proc.log_tail() if proc else ""
                if tail:
                    print("    " + tail.replace("\n", "\n    "), flush=True)
                notes.append(f"{name}: failed to start: {failed}")

            for conns, mode in RUNS:
                row = {"target": name, "conns": conns, "mode": mode}
                if failed is not None:
                    row.update(rps=None, p50_ms=None, p99_ms=None, errors=None, failed=failed)
                else:
                    if not (proc is None or proc.alive()):
                        row.update(rps=None, p50_ms=None, p99_ms=None, errors=None, failed="process died")
                    else:
                        row.update(run_wrk(url, scripts[(model, mode)], conns, duration))
                        if row.get("error"):
                            row["failed"] = row.pop("error")
                print(f"  {name:12s} c={conns:<3d} {mode:6s} req/s={fmt(row.get('rps'), '.0f'):>8s} "
                      f"p50={fmt(row.get('p50_ms'), '.3f')}ms errors={row.get('errors')}", flush=True)
                rows.append(row)

            # free the CPU for the next target (upstream stays: it is needed by everyone)
            if proc is not None and proc is not upstream:
                proc.stop()
                procs.remove(proc)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    finally:
        for p in reversed(procs):
            p.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    # ratios
    def find(target, conns, mode):
        for r in rows:
            if (r["target"], r["conns"], r["mode"]) == (target, conns, mode):
                return r
        return None

    for r in rows:
        pt = find("passthrough", r["conns"], r["mode"])
        d = find("direct", r["conns"], r["mode"])
        r["vs_passthrough"] = (r["rps"] / pt["rps"]) if (r.get("rps") and pt and pt.get("rps")) else None
        r["added_p50_ms"] = (r["p50_ms"] - d["p50_ms"]) if (r.get("p50_ms") is not None and d
                                                             and d.get("p50_ms") is not None) else None

    lines = [
        f"wrk -t1, {duration:.0f}s per run, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "",
        "| target | conns | mode | req/s | p50 ms | req/s vs passthrough | added p50 vs direct (ms) | errors |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r.get("failed"):
            lines.append(f"| {r['target']} | {r['conns']} | {r['mode']} | FAILED | – | – | – | – |")
            continue
        lines.append(
            f"| {r['target']} | {r['conns']} | {r['mode']} | {fmt(r['rps'], ',.0f')} | {fmt(r['p50_ms'], '.3f')} | "
            f"{fmt(r['vs_passthrough'], '.2f')}× | {fmt(r['added_p50_ms'], '+.3f')} | {r.get('errors')} |"
        )
    print()
    print("\n".join(lines))
    for n in notes:
        print(f"note: {n}")

    out = {
        "meta": {
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "duration_s": duration,
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "wrk_threads": 1,
        },
        "rows": rows,
        "notes": notes,
    }
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
