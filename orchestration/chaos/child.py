"""Run one chaos scenario in an environment of its own (docs/chaos.md, "Isolation").

    python -m orchestration.chaos.child NAME --runs N --dir DIR

Writes the scenario's Outcome as JSON to DIR/result.json (none when interrupted).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

import django

from .outcome import Outcome
from .processes import PostgresCluster, RedisServer, SkipScenario, Supervisor, driver_setup, service_env
from .scenarios import SCENARIOS, Scenario

RESULT_FILE = "result.json"
# Short recovery settings, so that a lost message or a dead worker shows within seconds (docs/chaos.md, "Isolation").
# The environment may override each (e.g. STEP_MAX_REDELIVERIES=1 bin/chaos).
TUNING = {
    "SWEEP_INTERVAL": "2",
    "RUN_STALL_AFTER": "6",
    "STEP_LEASE_GRACE": "3",
    "STEP_MAX_TIME_LIMIT": "660",
    "STEP_MAX_BACKOFF": "2",
    "WORKER_CONCURRENCY": "4",
}
log = logging.getLogger("chaos")


def scenario_env(redis_url: str, database_url: str) -> dict[str, str]:
    """The environment of every process of the scenario, this one included: its own Redis, database and port."""
    return {**TUNING, **service_env(redis_url, database_url)}


def run(scenario: Scenario, runs: int, directory: Path) -> Outcome:
    """Set the scenario's environment up, run it, and tear it all down."""
    try:
        with Supervisor(directory) as supervisor:
            redis = RedisServer(supervisor, directory / "redis")
            redis.start()
            postgres = PostgresCluster(supervisor, directory / "pg") if scenario.postgres else None
            if postgres is not None:
                postgres.create("chaos")
            database_url = postgres.url("chaos") if postgres else f"sqlite:///{directory / 'db.sqlite3'}"
            os.environ.update(scenario_env(redis.url, database_url))
            django.setup()
            from .stack import Stack  # reads settings: only after django.setup() with the scenario's environment

            stack = Stack(supervisor, scenario.name, dict(os.environ), redis, postgres)
            stack.start()
            return scenario.run(stack, runs)
    except SkipScenario as skip:
        return Outcome(scenario.name, skip=str(skip))
    except Exception as error:  # any error fails the scenario; its traceback goes to chaos.log
        log.exception("scenario %s failed", scenario.name)
        return Outcome(scenario.name, problems=[f"{type(error).__name__}: {error}"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", choices=sorted(SCENARIOS))
    parser.add_argument("--runs", type=int, required=True)
    parser.add_argument("--dir", type=Path, required=True)
    args = parser.parse_args()
    driver_setup(log)
    started = time.monotonic()
    outcome = run(SCENARIOS[args.name], args.runs, args.dir)
    outcome.seconds = round(time.monotonic() - started, 1)
    (args.dir / RESULT_FILE).write_text(json.dumps(outcome.as_dict()))


if __name__ == "__main__":
    main()
