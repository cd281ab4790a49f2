"""What the recorder's batch script costs Redis, against the script of another checkout.

    python bench/batch_script.py --compare DIR [--batches 100] [--rounds 3]

Builds 100 batches of 1,000 outcomes of a ``unit: user`` experiment (two arms, 3,000 users, every
built-in metric), and runs them through this checkout's script on one ``redis-server`` and through
``DIR``'s (e.g. a git worktree of an older commit) on another, alternating batch by batch so that
the machine's drift falls on both alike. Prints Redis's own time per call (``INFO commandstats``)
for each and the ratio, per round. Takes about a minute.
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import statistics
import sys
import tempfile
from pathlib import Path

import orjson
import redis

from abproxy.config import BUILTIN_METRICS
from abproxy.recording import layout
from abproxy.recording.aggregate import ArmBatch
from abproxy.recording.embedded_redis import EmbeddedRedis

ARGS = (layout.BATCH_DEDUPE_TTL_S, layout.UNIT_TTL_S, 7 * 24 * 3600)


def script_of(checkout: Path) -> str:
    """The batch script of a checkout: its .lua files, or (before they were) its store module's."""
    lua = checkout / "abproxy" / "recording" / "lua"
    if (lua / "record_batch.lua").exists():
        return (lua / "common.lua").read_text() + (lua / "record_batch.lua").read_text()
    spec = importlib.util.spec_from_file_location("other_store", checkout / "abproxy" / "recording" / "store.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["other_store"] = module
    spec.loader.exec_module(module)
    return str(module.RECORD_BATCH_LUA)


def batch(experiment: str, rng: random.Random) -> str:
    arms = []
    for arm_id in ("a@1", "b@2"):
        arm = ArmBatch("{}", counts_units=True, unit_metrics=BUILTIN_METRICS)
        for _ in range(500):
            row = (0.0, rng.lognormvariate(5, 0.5), float("nan"), float(rng.randrange(10, 400)),
                   float(rng.randrange(2, 80)), 20.0, float(rng.randrange(5, 100)), 100.0, 1e-4 * rng.random())  # fmt: skip
            arm.add(row, layout.hash_unit(f"user{rng.randrange(3000)}"))
        arms.append(arm.payload(experiment, arm_id))
    payload = {"records": [], "aliases": [], "hour": 1, "alias_prefix": layout.alias_prefix(experiment),
               "alias_counts": layout.alias_counts_key(experiment), "unit_schemas": layout.unit_schemas_key(experiment),
               "arms": arms}  # fmt: skip
    return orjson.dumps(payload).decode()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--compare", type=Path, required=True)
    parser.add_argument("--batches", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    scripts = {"this": script_of(Path(__file__).resolve().parent.parent), args.compare.name: script_of(args.compare)}
    rng = random.Random(1)
    batches = [batch("x", rng) for _ in range(args.batches)]
    folder = Path(tempfile.mkdtemp(prefix="abproxy-batch-script-"))
    servers = {name: EmbeddedRedis(folder / str(index), password="") for index, name in enumerate(scripts)}
    ratios = []
    try:
        clients, shas = {}, {}
        for name, server in servers.items():
            server.start()
            clients[name] = redis.Redis.from_url(server.url)
            shas[name] = clients[name].script_load(scripts[name])
        names = list(scripts)
        for round_ in range(args.rounds):
            for client in clients.values():
                client.config_resetstat()
            for index, payload in enumerate(batches):
                for name in names if index % 2 else reversed(names):
                    clients[name].evalsha(shas[name], 1, layout.batch_key("x", f"{round_}-{index}"), payload, *ARGS)
            took = {name: clients[name].info("commandstats")["cmdstat_evalsha"]["usec_per_call"] for name in names}
            ratios.append(took["this"] / took[names[1]])
            shown = ", ".join(f"{name} {value / 1000:.2f} ms" for name, value in took.items())
            print(f"round {round_ + 1}: {shown} per 1,000-outcome batch; this / {names[1]} {ratios[-1]:.3f}")
    finally:
        for server in servers.values():
            server.stop()
    print(f"median ratio {statistics.median(ratios):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
