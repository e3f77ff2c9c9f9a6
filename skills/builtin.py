"""Diagnostics skills: for users checking a deployment, and for tests."""

from __future__ import annotations

import time
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded

from .models import Effect, Reservation
from .registry import NO_DEFAULT, Breaker, SkillContext, SkillError, skill


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
    _sleep(float(ctx.args.get("seconds", 1)), shield=bool(ctx.args.get("shield")))
    return input


@skill(
    description="Sleeps args.seconds (default 0), then applies a side effect: one "
    "skills.Effect row keyed by the step's idempotency key, never deduplicated; "
    "then sleeps args.after (default 0) before it returns. "
    "Fault-injection tests count the rows to prove no effect is applied twice.",
    soft_time_limit=30,
    time_limit=40,
    max_soft_time_limit=600,
    max_time_limit=660,
)
def effect(ctx: SkillContext, input: Any) -> Any:
    _sleep(float(ctx.args.get("seconds", 0)), shield=False)
    Effect.objects.create(key=ctx.idempotency_key, run_id=ctx.run_id)
    _sleep(float(ctx.args.get("after", 0)), shield=False)
    return input


@skill(
    description="Records each call that runs it (one skills.Effect row keyed by the step's "
    "idempotency key), then returns its input, or args.value when given; with args.fail "
    "it raises instead. Its outputs are cached for 5 s (cache_ttl): tests count the rows "
    "to tell a cache hit from a call.",
    soft_time_limit=5,
    time_limit=10,
    cache_ttl=5,
)
def counted_echo(ctx: SkillContext, input: Any) -> Any:
    Effect.objects.create(key=ctx.idempotency_key, run_id=ctx.run_id)
    if ctx.args.get("fail"):
        raise SkillError("counted_echo: failing on purpose (args.fail)")
    return ctx.args.get("value", input)


def _sleep(seconds: float, *, shield: bool) -> None:
    """Sleep; with shield, keep sleeping through the soft time limit."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        try:
            time.sleep(left)
        except SoftTimeLimitExceeded:
            if not shield:
                raise


@skill(
    description="Waits for input (human in the loop): the run is waiting with args.prompt until "
    "POST /api/runs/{id}/resume/ gives the payload, which becomes this step's output. After "
    "args.timeout seconds (optional) it takes args.default if given, else it times out.",
    soft_time_limit=5,
    time_limit=10,
)
def ask_human(ctx: SkillContext, input: Any) -> Any:
    default = ctx.args.get("default", NO_DEFAULT)
    return ctx.wait(str(ctx.args.get("prompt", "Continue?")), ctx.args.get("timeout"), default)


@skill(
    description="Raises with args.message; args.transient false says a retry cannot help.",
    soft_time_limit=5,
    time_limit=10,
)
def fail(ctx: SkillContext, input: Any) -> Any:
    raise SkillError(str(ctx.args.get("message", "failed on purpose")), transient=ctx.args.get("transient", True))


@skill(
    description="Fails its first args.failures attempts (default 1), or with args.until "
    "(Unix seconds) every attempt before that time; then returns its input.",
    soft_time_limit=5,
    time_limit=10,
    retries=3,
    backoff=0.2,
    backoff_max=2,
)
def flaky(ctx: SkillContext, input: Any) -> Any:
    if "until" in ctx.args:
        if time.time() < float(ctx.args["until"]):
            raise SkillError(f"flaky: failing until {ctx.args['until']}")
        return input
    failures = int(ctx.args.get("failures", 1))
    if ctx.attempt <= failures:
        raise SkillError(f"flaky: attempt {ctx.attempt} of {failures} planned failures")
    return input


@skill(
    description="Has a circuit breaker (open after 3 consecutive failed attempts, for 5 s) and a fallback "
    '({"fallback": true}, the output of a skipped optional step). Each call writes one skills.Effect row '
    "(so tests count calls), sleeps args.seconds (default 0), then fails if args.fail, else returns its input.",
    soft_time_limit=5,
    time_limit=10,
    breaker=Breaker(fail_max=3, reset_timeout=5),
    fallback={"fallback": True},
)
def fragile(ctx: SkillContext, input: Any) -> Any:
    Effect.objects.create(key=ctx.idempotency_key, run_id=ctx.run_id)
    _sleep(float(ctx.args.get("seconds", 0)), shield=False)
    if ctx.args.get("fail"):
        raise SkillError("fragile: failing on purpose")
    return input


@skill(
    description="Saga diagnostics: holds one skills.Reservation row keyed by the step's idempotency key "
    '(kept if it exists) and returns {"reservation": key}. Compensated by release when its run fails.',
    soft_time_limit=5,
    time_limit=10,
    compensate="release",
)
def reserve(ctx: SkillContext, input: Any) -> Any:
    Reservation.objects.get_or_create(key=ctx.idempotency_key, defaults={"run_id": ctx.run_id})
    return {"reservation": ctx.idempotency_key}


@skill(
    description="Saga diagnostics, reserve's compensation: deletes the reservation named by its input's "
    'reservation (idempotent: none left is fine) and returns {"released": key}. With '
    "args.fail_release it raises instead (a compensation step has its compensated step's args: "
    "set it on the reserve step).",
    soft_time_limit=5,
    time_limit=10,
)
def release(ctx: SkillContext, input: Any) -> Any:
    key = input.get("reservation") if isinstance(input, dict) else None
    if not isinstance(key, str):
        raise SkillError(f'release: the input must be {{"reservation": key}}, not {input!r}')
    if ctx.args.get("fail_release"):
        raise SkillError(f"release: failing on purpose (args.fail_release), {key} kept")
    Reservation.objects.filter(key=key).delete()
    return {"released": key}
