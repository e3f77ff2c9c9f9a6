"""``manage.py chaos``: fault injection against real processes (docs/chaos.md).

    python manage.py chaos [--scenario NAME ...] [--runs N] [--json] [--keep]

Runs each scenario in a child process (``orchestration.chaos.child``); exits non-zero when any failed.
"""

from __future__ import annotations

import json
import shutil
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from orchestration.chaos.child import RESULT_FILE
from orchestration.chaos.outcome import Outcome
from orchestration.chaos.processes import run_driver
from orchestration.chaos.scenarios import SCENARIOS, Scenario

# How long a scenario gets to stop what it started after a Ctrl-C.
TEARDOWN_TIMEOUT = 60
# The child's exit codes after SIGINT and SIGTERM.
INTERRUPTED = (128 + signal.SIGINT, 128 + signal.SIGTERM)


class Command(BaseCommand):
    help = "Run chaos scenarios (kill workers, restart Redis, stop PostgreSQL) against real processes."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--scenario", action="append", choices=list(SCENARIOS), help="repeatable; default: all, in order"
        )
        parser.add_argument("--runs", type=int, help="override each scenario's count (kill-worker: its kills)")
        parser.add_argument(
            "--json", action="store_true", dest="as_json", help="print one JSON object instead of lines"
        )
        parser.add_argument("--keep", action="store_true", help="keep var/chaos/<scenario>/ even when it passed")

    def handle(
        self, *args: Any, scenario: list[str] | None, runs: int | None, as_json: bool, keep: bool, **options: Any
    ) -> None:
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
        outcomes = []
        try:
            for name in scenario or SCENARIOS:
                outcomes.append(run_scenario(SCENARIOS[name], runs, keep))
                if not as_json:
                    self.stdout.write(outcomes[-1].line())
        except KeyboardInterrupt:
            raise CommandError("interrupted; the processes it started are stopped", returncode=130) from None
        failed = [outcome.scenario for outcome in outcomes if outcome.status == "FAIL"]
        if as_json:
            report = {"passed": not failed, "scenarios": [outcome.as_dict() for outcome in outcomes]}
            self.stdout.write(json.dumps(report, indent=2))
        if failed:
            raise CommandError(f"failed: {', '.join(failed)}")


def run_scenario(scenario: Scenario, runs: int | None, keep: bool) -> Outcome:
    """Run the scenario's child process in a fresh var/chaos/<name>/ and read its outcome."""
    directory = Path(settings.BASE_DIR) / "var" / "chaos" / scenario.name
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    command = [sys.executable, "-m", "orchestration.chaos.child", scenario.name]
    command += ["--runs", str(runs or scenario.runs), "--dir", str(directory)]
    returncode, leftovers = run_driver(command, Path(settings.BASE_DIR), directory, "chaos.log", TEARDOWN_TIMEOUT)
    if returncode in INTERRUPTED:  # a Ctrl-C that reached the child but not us (we ignore SIGINT)
        raise KeyboardInterrupt
    outcome = _read_outcome(scenario, directory, returncode)
    outcome.expect(not leftovers, f"left running (killed): {', '.join(leftovers)}")
    if outcome.status == "FAIL" or keep:
        outcome.logs = f"{directory.relative_to(settings.BASE_DIR)}/"
    else:
        shutil.rmtree(directory)
    return outcome


def _read_outcome(scenario: Scenario, directory: Path, returncode: int) -> Outcome:
    try:
        return Outcome.from_dict(json.loads((directory / RESULT_FILE).read_text()))
    except FileNotFoundError:
        return Outcome(scenario.name, problems=[f"the scenario process exited with {returncode} and no result"])


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)
