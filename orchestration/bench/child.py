"""Run the benchmark in an environment of its own (docs/performance.md, "The benchmark").

    python -m orchestration.bench.child --dir DIR --database-url URL --redis-url URL [phase options]

Writes the phases' figures as JSON to DIR/result.json; each process logs to DIR/<name>.log.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import time
from pathlib import Path
from typing import Any

import django
import redis

from orchestration.chaos.processes import Supervisor, driver_setup, service_env

RESULT_FILE = "result.json"
log = logging.getLogger("bench")


def run(args: argparse.Namespace) -> dict[str, Any]:
    redis.Redis.from_url(args.redis_url).flushdb()  # the benchmark's own database number
    os.environ.update(service_env(args.redis_url, args.database_url))
    os.environ["BENCH_RAW_REDIS_URL"] = args.redis_url
    os.environ.setdefault("WORKER_CONCURRENCY", "4")
    django.setup()
    from . import measure  # reads settings: only after django.setup() with the benchmark's environment
    from .stack import BenchStack

    report: dict[str, Any] = {"machine": _machine(), "database": _vendor()}
    with Supervisor(args.dir) as supervisor:
        stack = BenchStack(supervisor, dict(os.environ))
        stack.start()
        report["worker_concurrency"] = int(os.environ["WORKER_CONCURRENCY"])
        _phase(report, "shapes", measure.shapes_phase, stack, args.shapes, args.rounds, args.batch, args.latency_runs)
        # A phase given 0 (runs, seconds or requests) is left out.
        if args.memory_runs:
            _phase(report, "memory", measure.memory_phase, stack, args.memory_runs, "single")
        if args.api_seconds:
            report["api"] = _timed("api", measure.api_phase, stack, args.api_rate, args.api_seconds)
        if args.reads:
            _phase(report, "reads", measure.reads_phase, stack, args.steps, args.reads)
    return report


def _phase(report: dict[str, Any], name: str, phase: Any, *args: Any) -> None:
    report.update(_timed(name, phase, *args))


def _timed(name: str, phase: Any, *args: Any) -> dict[str, Any]:
    log.info("phase %s", name)
    started = time.monotonic()
    figures: dict[str, Any] = phase(*args)
    log.info("phase %s took %.1f s: %s", name, time.monotonic() - started, json.dumps(figures))
    return figures


def _vendor() -> str:
    from django.db import connection

    return str(connection.vendor)


def _machine() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--shapes", nargs="+", required=True)
    parser.add_argument("--rounds", type=int, required=True)
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--latency-runs", type=int, required=True)
    parser.add_argument("--memory-runs", type=int, required=True)
    parser.add_argument("--api-rate", type=int, required=True)
    parser.add_argument("--api-seconds", type=int, required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--reads", type=int, required=True)
    args = parser.parse_args()
    driver_setup(log)
    started = time.monotonic()
    report = run(args)
    report["seconds"] = round(time.monotonic() - started, 1)
    (args.dir / RESULT_FILE).write_text(json.dumps(report))


if __name__ == "__main__":
    main()
