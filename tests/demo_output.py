"""Reading what `abproxy demo` prints last the way a user does: the shell lines to copy, and the
terminal table of `abproxy report` (test_demo.py, test_newcomer.py)."""

from __future__ import annotations

import re

FIRST_COMMAND = "abproxy report --config "
LAST_COMMAND = "mlflow ui --backend-store-uri "


def printed_commands(stdout: str) -> list[str]:
    """The lines from `abproxy report --config ...` to `mlflow ui ...`, as the demo printed them."""
    lines = stdout.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith(FIRST_COMMAND)]
    ends = [i for i, line in enumerate(lines) if line.startswith(LAST_COMMAND)]
    assert starts and ends, f"the demo printed no commands to see its results:\n{stdout[-3000:]}"
    return lines[starts[-1] : ends[-1] + 1]


def without_servers(commands: list[str]) -> str:
    """The commands as one shell script, minus `mlflow ui` (a server that runs until stopped)."""
    return "\n".join(line for line in commands if not line.startswith(LAST_COMMAND)) + "\n"


def report_requests(report: str, experiment: str) -> dict[str, int]:
    """Requests per variant in `abproxy report`'s table of ``experiment``."""
    section = report.split(f"{experiment}: status=", 1)[1].split("\n\n", 1)[0]
    rows = section.splitlines()[3:]  # headline, column names, rule
    found = {}
    for row in rows:
        match = re.match(r"(\S+)(?: \(control\))?(?: \*)?\s+(\d+)\s", row)
        if match:
            found[match.group(1)] = int(match.group(2))
    return found
