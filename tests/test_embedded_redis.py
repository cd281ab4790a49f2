import os
import pytest
import subprocess
import sys
import time

import redis

from abproxy.recording.embedded_redis import EmbeddedRedis, running_url


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_data_survives_a_restart_and_the_url_file_is_private(tmp_path):
    server = EmbeddedRedis(tmp_path / "redis")
    url = server.start()
    assert oct((tmp_path / "redis" / "url").stat().st_mode & 0o777) == "0o600"
    assert running_url(tmp_path / "redis") == url
    redis.Redis.from_url(url).set("kept", "yes")
    server.stop()
    assert running_url(tmp_path / "redis") is None

    again = EmbeddedRedis(tmp_path / "redis")
    try:
        assert redis.Redis.from_url(again.start()).get("kept") == b"yes"
    finally:
        again.stop()


@pytest.mark.slow
def test_a_password_is_required(tmp_path):
    server = EmbeddedRedis(tmp_path / "redis")
    url = server.start()
    try:
        anonymous = redis.Redis(host="127.0.0.1", port=server.port)
        try:
            anonymous.ping()
            raise AssertionError("the embedded Redis answered without its password")
        except redis.AuthenticationError:
            pass
        assert redis.Redis.from_url(url).ping()
    finally:
        server.stop()


@pytest.mark.slow
def test_the_server_stops_when_abproxy_is_killed(tmp_path):
    code = (
        "import sys, time\n"
        "from abproxy.recording.embedded_redis import EmbeddedRedis\n"
        "server = EmbeddedRedis(sys.argv[1]); server.start()\n"
        "print(server._process.pid, flush=True); time.sleep(120)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    assert _alive(child)
    parent.kill()  # SIGKILL: no chance for abproxy to clean up
    parent.wait()
    deadline = time.monotonic() + 15
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(child), "the embedded redis-server outlived a killed abproxy"
