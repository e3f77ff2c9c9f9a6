"""Idempotency-Key on run creation and on posting a message."""

from __future__ import annotations

import threading
from datetime import timedelta
from typing import Any

import pytest
from django.db import connection
from django.utils import timezone
from rest_framework.test import APIClient

from orchestration.models import IdempotencyKey, Message, Run
from orchestration.services import purge_keys

from .factories import ConversationFactory, token_for

pytestmark = pytest.mark.worker

SPEC = {"skill": "echo"}


def post_run(api: APIClient, conversation_id: int, key: str | None, body: Any = None) -> Any:
    headers = {"Idempotency-Key": key} if key is not None else {}
    body = body if body is not None else {"spec": SPEC, "input": "hi"}
    return api.post(f"/api/conversations/{conversation_id}/runs/", body, format="json", headers=headers)


def test_a_repeat_with_the_same_key_returns_the_same_run(worker, user, api):
    conversation = ConversationFactory.create(owner=user)

    first = post_run(api, conversation.pk, "order-42")
    again = post_run(api, conversation.pk, "order-42")

    assert (first.status_code, again.status_code) == (202, 202)
    assert again.data["id"] == first.data["id"]
    assert "Idempotent-Replayed" not in first.headers
    assert again.headers["Idempotent-Replayed"] == "true"
    assert Run.objects.count() == 1


def test_without_a_key_every_request_starts_a_run(worker, user, api):
    conversation = ConversationFactory.create(owner=user)

    post_run(api, conversation.pk, None)
    post_run(api, conversation.pk, None)

    assert Run.objects.count() == 2


def test_a_key_reused_for_a_different_request_is_refused(worker, user, api):
    conversation = ConversationFactory.create(owner=user)
    post_run(api, conversation.pk, "k1")

    response = post_run(api, conversation.pk, "k1", {"spec": SPEC, "input": "something else"})

    assert response.status_code == 422
    assert response.data == {"Idempotency-Key": "this Idempotency-Key was already used for a different request"}
    assert Run.objects.count() == 1


def test_keys_belong_to_their_user(worker, user, other_user, api):
    other_api = APIClient()
    other_api.credentials(HTTP_AUTHORIZATION=f"Token {token_for(other_user)}")

    mine = post_run(api, ConversationFactory.create(owner=user).pk, "same")
    theirs = post_run(other_api, ConversationFactory.create(owner=other_user).pk, "same")

    assert mine.data["id"] != theirs.data["id"]


@pytest.mark.parametrize("key", ["", "x" * 256, "naïve", "tab\there"])
def test_a_malformed_key_is_a_400(worker, user, api, key):
    response = post_run(api, ConversationFactory.create(owner=user).pk, key)

    assert response.status_code == 400
    assert response.data == {"Idempotency-Key": "must be 1 to 255 printable ASCII characters"}


def test_posting_a_message_twice_with_a_key_stores_one_message_and_one_run(worker, user, api):
    conversation = ConversationFactory.create(owner=user)
    url = f"/api/conversations/{conversation.pk}/messages/"

    body = {"content": "hello", "spec": SPEC}
    first = api.post(url, body, format="json", HTTP_IDEMPOTENCY_KEY="msg-1")
    again = api.post(url, body, format="json", HTTP_IDEMPOTENCY_KEY="msg-1")

    assert again.status_code == 202
    assert again.data["message"]["id"] == first.data["message"]["id"]
    assert again.data["run"]["id"] == first.data["run"]["id"]
    assert Message.objects.filter(role="user").count() == 1


def test_twenty_concurrent_requests_with_one_key_create_one_run(worker, user):
    conversation = ConversationFactory.create(owner=user)
    token = token_for(user)
    start = threading.Barrier(20)
    answers: list[Any] = []

    def request() -> None:
        client = APIClient()
        client.credentials(HTTP_AUTHORIZATION=f"Token {token}")
        try:
            start.wait()
            response = post_run(client, conversation.pk, "burst")
            answers.append((response.status_code, response.data.get("id")))
        finally:
            connection.close()

    threads = [threading.Thread(target=request) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert Run.objects.count() == 1
    assert answers == [(202, Run.objects.get().pk)] * 20


def test_an_expired_key_starts_a_new_run_and_the_sweeper_forgets_it(worker, user, api, settings):
    conversation = ConversationFactory.create(owner=user)
    first = post_run(api, conversation.pk, "old")
    IdempotencyKey.objects.update(expires_at=timezone.now() - timedelta(seconds=1))

    again = post_run(api, conversation.pk, "old")

    assert again.data["id"] != first.data["id"]
    assert IdempotencyKey.objects.get().run_id == again.data["id"]
    IdempotencyKey.objects.update(expires_at=timezone.now() - timedelta(seconds=1))
    assert purge_keys(timezone.now()) == 1
    assert not IdempotencyKey.objects.exists()


def test_keys_live_for_the_configured_time(worker, user, api, settings):
    settings.IDEMPOTENCY_KEY_TTL = 120
    post_run(api, ConversationFactory.create(owner=user).pk, "ttl")

    key = IdempotencyKey.objects.get()

    assert timedelta(seconds=119) < key.expires_at - key.created_at <= timedelta(seconds=121)
