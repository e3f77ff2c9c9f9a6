"""Completion webhooks: a CloudEvent POSTed to the run's webhook URL when it ends, signed, retried with backoff.

Receivers check ``Agentsite-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(WEBHOOK_SECRET, "<t>." + body)>``
and may drop repeats by the CloudEvent's ``id``: docs/design.md, "Completion webhooks".
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import random
import time
from datetime import datetime, timedelta
from typing import Any

import httpx
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent
from django.conf import settings
from django.db import transaction
from django.utils import timezone

from agentsite import outbound

from . import broker
from .canvas import CONTROL_QUEUE
from .models import Run, WebhookDelivery, WebhookStatus
from .transitions import RunEnded

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "Agentsite-Signature"
CONTENT_TYPE = "application/cloudevents+json"
DELIVER_TASK = "agentsite.deliver_webhook"


def signature(body: bytes, timestamp: int, secret: str = "") -> str:
    """The value of SIGNATURE_HEADER for ``body`` sent at ``timestamp``."""
    key = (secret or settings.WEBHOOK_SECRET).encode()
    digest = hmac.new(key, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def on_run_ended(sender: Any, run: RunEnded, **kwargs: Any) -> None:
    """transitions.run_ended: a run with a webhook gets its completion delivery, sent once committed."""
    if run.webhook_url:
        schedule(run.id, run.event_seq)


def schedule(run_id: int, event_seq: int) -> None:
    """Store the run's completion delivery, sent once committed; ``event_seq`` (its terminal event's) makes its id."""
    run = Run.objects.select_related("workflow").get(pk=run_id)
    event_id = f"{run.pk}-{event_seq}"
    delivery = WebhookDelivery.objects.create(
        run=run,
        url=run.webhook_url,
        event_id=event_id,
        body=JSONFormat().write(completion_event(run, event_id)).decode(),
        next_attempt_at=timezone.now(),
    )
    transaction.on_commit(lambda: publish(delivery.pk))


def completion_event(run: Run, event_id: str) -> CloudEvent:
    attributes = {
        "type": f"agentsite.run.{run.status}",
        "source": f"/api/runs/{run.pk}/",
        "id": event_id,
        "time": run.finished_at or timezone.now(),
        "subject": str(run.pk),
        "datacontenttype": "application/json",
    }
    data = {
        "id": run.pk,
        "status": run.status,
        "output": run.output,
        "error": run.error,
        "workflow": run.workflow.name if run.workflow else None,
        "conversation": run.conversation_id,
        "created_at": run.created_at.isoformat(),
        "finished_at": run.finished_at.isoformat() if run.finished_at else None,
        "duration_ms": run.duration_ms,
        "replays": run.replays,
    }
    return CloudEvent(attributes, data)


def publish(delivery_id: int, countdown: float = 0) -> None:
    """Queue the delivery's next attempt; if the broker is down, the sweeper does it later."""
    broker.send_task(DELIVER_TASK, (delivery_id,), CONTROL_QUEUE, countdown)


def deliver(delivery_id: int) -> None:
    """Make one attempt; on failure, queue the next one with backoff, or give up."""
    delivery = WebhookDelivery.objects.filter(pk=delivery_id, status=WebhookStatus.PENDING).first()
    if delivery is None:
        return  # delivered already, or gave up
    attempt = delivery.attempts + 1
    status, error = _send(delivery)
    now = timezone.now()
    pending = WebhookDelivery.objects.filter(pk=delivery.pk, status=WebhookStatus.PENDING, attempts=delivery.attempts)
    if not error:
        pending.update(
            status=WebhookStatus.DELIVERED, attempts=attempt, response_status=status, error="", delivered_at=now
        )
        return
    if attempt >= settings.WEBHOOK_MAX_ATTEMPTS:
        error = f"gave up after {attempt} attempts: {error}"
        pending.update(status=WebhookStatus.FAILED, attempts=attempt, response_status=status, error=error)
        log.warning("webhook delivery %s for run %s failed: %s", delivery.pk, delivery.run_id, error)
        return
    countdown = backoff(attempt)
    next_attempt = now + timedelta(seconds=countdown)
    if pending.update(attempts=attempt, response_status=status, error=error, next_attempt_at=next_attempt):
        publish(delivery.pk, countdown)


def _send(delivery: WebhookDelivery) -> tuple[int | None, str]:
    """POST the delivery once: (HTTP status or None, error or "")."""
    body = delivery.body.encode()
    headers = {
        "Content-Type": CONTENT_TYPE,
        SIGNATURE_HEADER: signature(body, int(time.time())),
        "User-Agent": "agentsite-webhooks",
    }
    try:
        reply = outbound.post(delivery.url, body, headers, timeout=settings.WEBHOOK_TIMEOUT)
    except outbound.UnsafeURL as exc:
        return None, f"refused: {exc}"
    except (outbound.OutboundError, httpx.HTTPError) as exc:
        return None, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    if 200 <= reply.status < 300:
        return reply.status, ""
    return reply.status, f"HTTP {reply.status}: {reply.body[:200]}"


def backoff(attempt: int) -> float:
    """Seconds before attempt ``attempt`` + 1: exponential from 1 s, jittered, capped."""
    return min(settings.WEBHOOK_BACKOFF_MAX, 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)


def resume_lost(now: datetime) -> list[int]:
    """Republish pending deliveries whose attempt is long overdue (their message was lost)."""
    overdue = now - timedelta(seconds=settings.WEBHOOK_STALL_AFTER)
    due = WebhookDelivery.objects.filter(status=WebhookStatus.PENDING, next_attempt_at__lt=overdue)
    ids = list(due.values_list("pk", flat=True)[:200])
    WebhookDelivery.objects.filter(pk__in=ids).update(next_attempt_at=now)
    for delivery_id in ids:
        publish(delivery_id)
    return ids
