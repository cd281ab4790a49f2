"""The README's first command on a fresh machine: the repository's tracked files, a new venv with
no system site packages, `pip install -e .` without extras, `abproxy demo` — then the commands
the demo printed, pasted into a shell, must show its results and leave no stray MLflow store."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from demo_output import printed_commands, report_requests, without_servers

REPOSITORY = Path(__file__).resolve().parents[1]
# What a newcomer's shell would not have: this checkout's import path, an active venv, settings
# for MLflow or abproxy.
FOREIGN_ENVIRONMENT = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "MLFLOW_", "ABPROXY_")


def copy_tracked_files(destination: Path) -> Path:
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPOSITORY, capture_output=True, check=True).stdout
    for name in filter(None, listed.decode().split("\0")):
        source = REPOSITORY / name
        if source.is_file():  # a tracked file deleted in the working tree is not part of the copy
            target = destination / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    return destination


def newcomer_environment(venv: Path) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith(FOREIGN_ENVIRONMENT)}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env['PATH']}"  # as `source .venv/bin/activate` does
    env["VIRTUAL_ENV"] = str(venv)
    return env


def run(command: list[str], cwd: Path, env: dict[str, str], timeout_s: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout_s)


@pytest.mark.slow
def test_readme_first_command_in_a_fresh_venv_then_the_printed_commands(tmp_path: Path) -> None:
    checkout = copy_tracked_files(tmp_path / "abproxy")
    venv = tmp_path / "venv"
    env = newcomer_environment(venv)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, env=env, timeout=120)

    # No network to a package index is a failure here, not a skip: it is the README's first step.
    # --no-compile installs the same packages and saves pip about 45 s of writing bytecode for
    # all of MLflow; what the demo imports is compiled as it runs.
    install = run([str(venv / "bin" / "pip"), "install", "--no-compile", "-e", "."], checkout, env, timeout_s=900)
    assert install.returncode == 0, f"pip install -e . failed:\n{install.stdout[-3000:]}\n{install.stderr[-3000:]}"

    demo = run([str(venv / "bin" / "abproxy"), "demo"], checkout, env, timeout_s=300)
    assert demo.returncode == 0, demo.stderr[-3000:]
    assert "translation    professional (winner)" in demo.stdout, demo.stdout[-3000:]

    shown = run(["bash", "-e", "-c", without_servers(printed_commands(demo.stdout))], checkout, env, timeout_s=180)

    assert shown.returncode == 0, shown.stderr[-3000:]
    requests = report_requests(shown.stdout, "translation")
    assert set(requests) == {"basic", "professional", "context_aware", "step_by_step"}
    assert all(count > 0 for count in requests.values()), requests
    assert re.search(r"^0\s+professional\s+\d\.\d+$", shown.stdout, re.M), shown.stdout  # the winner's run
    assert not (checkout / "mlflow.db").exists(), "the printed query must read the demo's store, not ./mlflow.db"
    assert not (checkout / "mlruns").exists()
