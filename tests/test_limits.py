"""Size limits: request bodies (413), specs, run inputs and messages (400), page sizes."""

from __future__ import annotations

import json
from typing import Any

import pytest
from django.conf import settings

from orchestration.models import Conversation, Message, Run, Workflow

from .factories import ConversationFactory

pytestmark = pytest.mark.django_db

ECHO = {"skill": "echo"}
MEGABYTE = 1024 * 1024


@pytest.fixture
def conversation(user):
    return ConversationFactory.create(owner=user)


def post_json(client, url: str, body: dict) -> Any:
    """POST ``body`` as the raw JSON bytes a client would send (the test client adds Content-Length)."""
    return client.post(url, data=json.dumps(body), content_type="application/json")


def run_body(size: int) -> dict:
    return {"spec": ECHO, "input": {"text": "x" * size}}


def message_body(size: int) -> dict:
    return {"content": "x" * size, "spec": ECHO}


def assert_nothing_written() -> None:
    assert not Run.objects.exists()
    assert not Message.objects.exists()


@pytest.mark.parametrize(("path", "make_body"), [("runs", run_body), ("messages", message_body)])
def test_it_refuses_a_body_over_one_megabyte_with_413(api, conversation, path, make_body):
    body = json.dumps(make_body(MEGABYTE))

    response = api.post(f"/api/conversations/{conversation.pk}/{path}/", data=body, content_type="application/json")

    assert response.status_code == 413
    assert response["Content-Type"] == "application/json"
    assert response.json() == {
        "detail": f"the request body is {len(body)} bytes; the limit is {MEGABYTE} bytes",
        "limit": MEGABYTE,
    }
    assert_nothing_written()


def test_it_refuses_a_large_body_before_authentication(anon, conversation):
    response = post_json(anon, f"/api/conversations/{conversation.pk}/runs/", run_body(MEGABYTE))

    assert response.status_code == 413


def test_it_reads_the_body_limit_from_settings(api, conversation, settings):
    settings.REQUEST_MAX_BYTES = 2000
    url = f"/api/conversations/{conversation.pk}/runs/"

    assert post_json(api, url, run_body(1000)).status_code == 202
    assert post_json(api, url, run_body(2000)).status_code == 413


def test_djangos_own_body_limit_agrees_with_ours():
    assert settings.DATA_UPLOAD_MAX_MEMORY_SIZE == settings.REQUEST_MAX_BYTES


@pytest.mark.parametrize("path", ["workflows", "runs", "messages"])
def test_it_refuses_a_spec_larger_than_the_limit_naming_it(api, conversation, path):
    limit = settings.SPEC_MAX_BYTES
    spec = {"skill": "echo", "args": {"value": "x" * limit}}
    size = len(json.dumps(spec, separators=(",", ":")))
    body = {"name": "refused", "content": "hi", "spec": spec}
    url = "/api/workflows/" if path == "workflows" else f"/api/conversations/{conversation.pk}/{path}/"

    response = post_json(api, url, body)

    assert response.status_code == 400
    assert response.json() == {"spec": [f"spec: {size} bytes of JSON, more than the limit of {limit} bytes"]}
    assert_nothing_written()
    assert not Workflow.objects.filter(name="refused").exists()


def test_it_refuses_a_run_input_larger_than_the_limit_naming_it(api, conversation):
    limit = settings.RUN_INPUT_MAX_BYTES
    body = run_body(limit)
    size = len(json.dumps(body["input"], separators=(",", ":")))

    response = post_json(api, f"/api/conversations/{conversation.pk}/runs/", body)

    assert response.status_code == 400
    assert response.json() == {"input": [f"input: {size} bytes of JSON, more than the limit of {limit} bytes"]}
    assert_nothing_written()


def test_it_accepts_a_run_input_of_exactly_the_limit_counting_utf8_bytes(api, conversation):
    room = settings.RUN_INPUT_MAX_BYTES - len('{"text":""}')
    text = "é" * (room // 2) + "x" * (room % 2)  # "é" is two bytes in UTF-8
    url = f"/api/conversations/{conversation.pk}/runs/"

    assert post_json(api, url, {"spec": ECHO, "input": {"text": text}}).status_code == 202
    assert post_json(api, url, {"spec": ECHO, "input": {"text": text + "x"}}).status_code == 400


def test_it_refuses_message_content_longer_than_the_limit_naming_it(api, conversation):
    limit = settings.MESSAGE_MAX_CHARS

    response = post_json(api, f"/api/conversations/{conversation.pk}/messages/", message_body(limit + 1))

    assert response.status_code == 400
    assert response.json() == {"content": [f"Ensure this field has no more than {limit} characters."]}
    assert_nothing_written()


def test_it_accepts_message_content_of_exactly_the_limit(api, conversation):
    body = message_body(settings.MESSAGE_MAX_CHARS)

    response = post_json(api, f"/api/conversations/{conversation.pk}/messages/", body)

    assert response.status_code == 202, response.content


def test_it_clamps_a_page_size_over_the_maximum(api, user):
    Conversation.objects.bulk_create(Conversation(owner=user) for _ in range(settings.API_MAX_PAGE_SIZE + 1))

    response = api.get("/api/conversations/", {"page_size": settings.API_MAX_PAGE_SIZE + 1})

    assert response.status_code == 200
    assert len(response.json()["results"]) == settings.API_MAX_PAGE_SIZE


@pytest.mark.parametrize("page_size", ["0", "-1", "ten"])
def test_a_page_size_that_is_not_a_positive_number_gives_the_default_page(api, user, page_size):
    ConversationFactory.create_batch(51, owner=user)

    response = api.get("/api/conversations/", {"page_size": page_size})

    assert response.status_code == 200
    assert len(response.json()["results"]) == 50
