"""Diagnostics skills: for users checking a deployment, and for tests."""

from __future__ import annotations

import time
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded

from .registry import SkillContext, SkillError, skill


@skill(
    description="Returns its input, or args.value when given.",
    soft_time_limit=5,
    time_limit=10,
    max_soft_time_limit=60,
    max_time_limit=70,
)
def echo(ctx: SkillContext, input: Any) -> Any:
    return ctx.args.get("value", input)


@skill(
    description="Sleeps args.seconds, then returns its input. With args.shield it "
    "keeps sleeping through the soft time limit (to exercise the hard one).",
    soft_time_limit=30,
    time_limit=40,
    max_soft_time_limit=600,
    max_time_limit=660,
)
def sleep(ctx: SkillContext, input: Any) -> Any:
    deadline = time.monotonic() + float(ctx.args.get("seconds", 1))
    while (left := deadline - time.monotonic()) > 0:
        try:
            time.sleep(left)
        except SoftTimeLimitExceeded:
            if not ctx.args.get("shield"):
                raise
    return input


@skill(description="Raises with args.message.", soft_time_limit=5, time_limit=10)
def fail(ctx: SkillContext, input: Any) -> Any:
    raise SkillError(str(ctx.args.get("message", "failed on purpose")))


@skill(
    description="Fails its first args.failures attempts, then returns its input.",
    soft_time_limit=5,
    time_limit=10,
    retries=3,
    backoff=0.2,
    backoff_max=2,
)
def flaky(ctx: SkillContext, input: Any) -> Any:
    failures = int(ctx.args.get("failures", 1))
    if ctx.attempt <= failures:
        raise SkillError(f"flaky: attempt {ctx.attempt} of {failures} planned failures")
    return input
