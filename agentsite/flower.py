"""Start Flower safely: ``python -m agentsite.flower`` (the Procfile's flower line).

Refuses to start without ``FLOWER_BASIC_AUTH`` unless ``DEBUG`` is on, passes it through the environment
(never the command line), listens on loopback unless ``FLOWER_ADDRESS`` says otherwise and keeps at most
FLOWER_MAX_TASKS tasks (docs/operations.md, "Flower").
"""

from __future__ import annotations

import os
import sys

import environ

env = environ.Env()


def credentials_error(value: str) -> str | None:
    """Why a FLOWER_BASIC_AUTH value is unusable, or None when it is fine."""
    for entry in value.split(","):
        user, _, password = entry.partition(":")
        if not user or not password:
            return "FLOWER_BASIC_AUTH must be user:password (several separated by commas)"
    return None


def command(address: str, port: int, max_tasks: int) -> list[str]:
    """Flower on ``address:port``, keeping at most ``max_tasks`` tasks in memory (the oldest go first)."""
    flower = ["flower", f"--address={address}", f"--port={port}", f"--max_tasks={max_tasks}"]
    return [sys.executable, "-m", "celery", "-A", "agentsite", *flower]


def main() -> None:
    # Flower keeps its own Prometheus metrics in its process (its /metrics), not among agentsite's files.
    os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
    auth = os.environ.pop("FLOWER_BASIC_AUTH", "").strip()
    if auth:
        if error := credentials_error(auth):
            sys.exit(f"flower: {error}")
        os.environ["FLOWER_BASIC_AUTH"] = auth
    elif env.bool("DEBUG", default=False):
        print("flower: no FLOWER_BASIC_AUTH; running without authentication because DEBUG is on", file=sys.stderr)
    else:
        sys.exit(
            "flower: refusing to start without FLOWER_BASIC_AUTH: Flower shows every task's arguments "
            "and results and can revoke tasks. Set FLOWER_BASIC_AUTH=user:password (or DEBUG=1 locally)."
        )
    argv = command(
        env.str("FLOWER_ADDRESS", default="127.0.0.1"),
        env.int("FLOWER_PORT", default=5555),
        env.int("FLOWER_MAX_TASKS", default=10000),
    )
    os.execv(argv[0], argv)


if __name__ == "__main__":
    main()
