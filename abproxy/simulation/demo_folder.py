"""The demo's own folder: claimed only when it is new, empty or an earlier demo's, and holding
the config the demo ran with beside its Redis data and MLflow store, so that the commands the
demo prints last (``abproxy report --config ...``, the MLflow UI and a query) show its results
from any working directory, after the demo or while ``--keep`` keeps it running."""

from __future__ import annotations

import shlex
import shutil
from pathlib import Path
from typing import Any

import yaml

from abproxy.recording.embedded_redis import running_url

MARKER = ".abproxy-demo"
CONFIG_FILE = "abproxy.yaml"
MLFLOW_STORE = "mlflow.db"
REDIS_DIR = "redis"

_CONFIG_HEADER = (
    "# Written by `abproxy demo`: the config it ran with. `abproxy report --config <this file>` and\n"
    "# `abproxy flush --config <this file>` read the demo's Redis data and MLflow store.\n"
)
# The scenario's experiment with the clearest winner, and its primary metric.
_SHOWN_EXPERIMENT = "translation"
_SHOWN_METRIC = "feedback.satisfaction"


class FolderRefused(Exception):
    """The demo will not empty or share this folder."""


def claim(directory: Path) -> Path:
    """``directory`` made an empty folder of the demo's own; returns its absolute path. An earlier
    demo's folder is emptied; a folder holding anything else is refused, and nothing is deleted."""
    folder = directory.resolve()
    if folder.exists() and not folder.is_dir():
        raise FolderRefused(f"--dir {directory} is a file, not a folder")
    if folder.is_dir() and any(folder.iterdir()):
        _check_reusable(folder, directory)
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MARKER).write_text("Made by `abproxy demo`, which empties and refills this folder when run on it again.\n")
    return folder


def _check_reusable(folder: Path, shown: Path) -> None:
    if not (folder / MARKER).is_file():
        raise FolderRefused(
            f"--dir {shown} holds files the demo did not create, so it will not delete them (nothing was "
            "touched). Choose a new or empty folder, or an earlier demo's."
        )
    if running_url(folder / REDIS_DIR):
        raise FolderRefused(f"a demo is still running on --dir {shown} (started with --keep?); stop it first")


def tracking_uri(folder: Path) -> str:
    return f"sqlite:///{folder / MLFLOW_STORE}"


def write_config(folder: Path, settings: dict[str, Any]) -> Path:
    """The config the demo runs with, as YAML in its folder (``settings`` hold no ``${VAR}``)."""
    path = folder / CONFIG_FILE
    path.write_text(_CONFIG_HEADER + yaml.safe_dump(settings, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path


def viewing_commands(folder: Path) -> str:
    """Shell lines that show the demo's results; the README shows the same lines."""
    uri = shlex.quote(tracking_uri(folder))
    query = (
        f'winners = mlflow.search_runs(experiment_names=["{_SHOWN_EXPERIMENT}"], '
        "filter_string=\"tags.`abproxy.winner` = 'true'\")"
    )
    return "\n".join(
        [
            f"abproxy report --config {shlex.quote(str(folder / CONFIG_FILE))}",
            f"export MLFLOW_TRACKING_URI={uri}",
            # A here-document: the query holds both kinds of quotes and backticks, which a
            # shell's double quotes would run as a command.
            "python - <<'EOF'",
            "import mlflow",
            query,
            f'print(winners.filter(["tags.abproxy.variant", "metrics.{_SHOWN_METRIC}.mean"]))',
            "EOF",
            f"mlflow ui --backend-store-uri {uri}",
        ]
    )
