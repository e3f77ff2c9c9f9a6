"""Locust user for ``manage.py bench``: N users together create runs at a fixed, even rate.

User i of N sends every 1 / BENCH_USER_RATE seconds at i/N of that period, and catches up
on its schedule when it falls behind. The bench passes BENCH_TOKEN, BENCH_RUNS_PATH,
BENCH_USER_RATE and BENCH_USERS.
"""

from __future__ import annotations

import itertools
import math
import os
import time

import gevent
from locust import FastHttpUser, task

# All users post to one conversation: "allow" starts each run at once (no double-texting queue).
BODY = {"spec": {"skill": "echo"}, "input": {"question": "hello"}, "on_active": "allow"}
PERIOD = 1 / float(os.environ.get("BENCH_USER_RATE", "1"))
USERS = int(os.environ.get("BENCH_USERS", "1"))
ORIGIN = time.monotonic()
_started = itertools.count()


class RunCreator(FastHttpUser):
    """Sends at ORIGIN + offset + k * PERIOD, not by locust's ``constant_throughput``, which sends in bursts.

    See docs/performance.md, "The load generator's schedule".
    """

    def on_start(self) -> None:
        self.headers = {"Authorization": f"Token {os.environ['BENCH_TOKEN']}"}
        self.path = os.environ["BENCH_RUNS_PATH"]
        offset = next(_started) % USERS / USERS * PERIOD
        periods = max(0, math.ceil((time.monotonic() - ORIGIN - offset) / PERIOD))
        self.next_send = ORIGIN + offset + periods * PERIOD
        gevent.sleep(max(0.0, self.next_send - time.monotonic()))

    def wait_time(self) -> float:
        self.next_send += PERIOD
        return max(0.0, self.next_send - time.monotonic())

    @task
    def create_run(self) -> None:
        with self.client.post(self.path, json=BODY, headers=self.headers, catch_response=True) as response:
            if response.status_code != 202:
                response.failure(f"{response.status_code}: {response.text[:200]}")
