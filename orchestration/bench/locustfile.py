"""Locust user for ``manage.py bench``: each user creates BENCH_USER_RATE runs per second.

With N users that is N * BENCH_USER_RATE run creations per second as long as
a response comes within 1 / BENCH_USER_RATE seconds. The bench passes
BENCH_TOKEN, BENCH_RUNS_PATH and BENCH_USER_RATE.
"""

from __future__ import annotations

import os

from locust import FastHttpUser, constant_throughput, task

# All users post to one conversation: "allow" starts each run at once (no double-texting queue).
BODY = {"spec": {"skill": "echo"}, "input": {"question": "hello"}, "on_active": "allow"}


class RunCreator(FastHttpUser):
    wait_time = constant_throughput(float(os.environ.get("BENCH_USER_RATE", "1")))

    def on_start(self) -> None:
        self.headers = {"Authorization": f"Token {os.environ['BENCH_TOKEN']}"}
        self.path = os.environ["BENCH_RUNS_PATH"]

    @task
    def create_run(self) -> None:
        with self.client.post(self.path, json=BODY, headers=self.headers, catch_response=True) as response:
            if response.status_code != 202:
                response.failure(f"{response.status_code}: {response.text[:200]}")
