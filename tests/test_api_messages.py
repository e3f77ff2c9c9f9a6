"""/api/conversations/{id}/messages/: a user message starts a run; its output is the reply."""

from __future__ import annotations

import pytest
from django.conf import settings

from orchestration.models import Message, Run, Workflow

from .conftest import wait_for_run
from .factories import ConversationFactory, MessageFactory, WorkflowFactory

pytestmark = pytest.mark.django_db


@pytest.fixture
def conversation(user):
    return ConversationFactory.create(owner=user)


@pytest.fixture
def default_workflow():
    """The workflow settings.DEFAULT_WORKFLOW names (a flushed database may have lost the migration's)."""
    Workflow.objects.filter(name=settings.DEFAULT_WORKFLOW).delete()
    return WorkflowFactory.create(name=settings.DEFAULT_WORKFLOW, spec={"skill": "echo", "id": "reply"})


def messages_url(conversation) -> str:
    return f"/api/conversations/{conversation.pk}/messages/"


def test_it_accepts_a_message_for_a_named_workflow(api, conversation):
    workflow = WorkflowFactory.create(spec={"chain": [{"skill": "echo"}, {"skill": "echo"}]})

    response = api.post(messages_url(conversation), {"content": "hello", "workflow": workflow.name}, format="json")

    assert response.status_code == 202, response.content
    body = response.json()
    assert set(body) == {"message", "run", "on_active"}
    assert (body["message"]["role"], body["message"]["content"]) == ("user", "hello")
    assert body["message"]["run"] == body["run"]["id"]
    assert body["run"]["status"] == "queued"
    assert body["run"]["workflow"] == workflow.name
    assert body["run"]["conversation"] == conversation.pk
    run = Run.objects.get(pk=body["run"]["id"])
    assert run.spec == workflow.spec
    assert run.input == {"content": "hello", "conversation_id": conversation.pk}
    assert run.steps.count() == 2


def test_it_accepts_a_message_with_a_spec(api, conversation):
    spec = {"skill": "echo", "args": {"value": "hi back"}}

    response = api.post(messages_url(conversation), {"content": "hello", "spec": spec}, format="json")

    assert response.status_code == 202, response.content
    run = Run.objects.get(pk=response.json()["run"]["id"])
    assert response.json()["run"]["workflow"] is None
    assert run.spec == spec


def test_it_starts_the_default_workflow_when_none_is_named(api, conversation, default_workflow):
    response = api.post(messages_url(conversation), {"content": "hello"}, format="json")

    assert response.status_code == 202, response.content
    assert response.json()["run"]["workflow"] == settings.DEFAULT_WORKFLOW
    assert Run.objects.get(pk=response.json()["run"]["id"]).spec == default_workflow.spec


def test_it_says_so_when_there_is_no_default_workflow(api, conversation):
    Workflow.objects.filter(name=settings.DEFAULT_WORKFLOW).delete()

    response = api.post(messages_url(conversation), {"content": "hello"}, format="json")

    assert response.status_code == 400
    assert list(response.json()) == ["workflow"]
    assert not Message.objects.exists()


def test_it_lets_a_user_run_a_shared_workflow(api, conversation):
    shared = WorkflowFactory.create(owner=None)

    response = api.post(messages_url(conversation), {"content": "hi", "workflow": shared.name}, format="json")

    assert response.status_code == 202


@pytest.mark.parametrize("body", [{}, {"content": ""}, {"content": None}, {"content": "x" * 100_001}])
def test_it_requires_content(api, conversation, default_workflow, body):
    response = api.post(messages_url(conversation), body, format="json")

    assert response.status_code == 400
    assert list(response.json()) == ["content"]
    assert not Message.objects.exists()
    assert not Run.objects.exists()


def test_it_lists_a_conversations_messages_in_order(api, conversation):
    first = MessageFactory.create(conversation=conversation, role="user")
    second = MessageFactory.create(conversation=conversation, role="assistant")
    MessageFactory.create()  # another conversation's

    response = api.get(messages_url(conversation))

    assert response.status_code == 200
    results = response.json()["results"]
    assert [(m["id"], m["role"], m["content"]) for m in results] == [
        (first.pk, "user", first.content),
        (second.pk, "assistant", second.content),
    ]


@pytest.mark.parametrize("method", ["get", "post"])
def test_it_answers_404_for_another_users_conversation(api, other_user, default_workflow, method):
    theirs = ConversationFactory.create(owner=other_user)
    MessageFactory.create(conversation=theirs)

    response = getattr(api, method)(messages_url(theirs), {"content": "let me in"}, format="json")

    assert response.status_code == 404
    assert Message.objects.filter(conversation=theirs).count() == 1
    assert not Run.objects.exists()


@pytest.mark.parametrize("method", ["get", "post"])
def test_it_needs_authentication(anon, conversation, default_workflow, method):
    response = getattr(anon, method)(messages_url(conversation), {"content": "hi"}, format="json")

    assert response.status_code == 401
    assert not Message.objects.exists()


def test_the_run_answers_with_an_assistant_message(worker, api, user):
    conversation = ConversationFactory.create(owner=user)
    workflow = WorkflowFactory.create(
        spec={"chain": [{"skill": "echo"}, {"skill": "echo", "args": {"value": "Hi there!"}}]}
    )

    response = api.post(messages_url(conversation), {"content": "hello", "workflow": workflow.name}, format="json")
    run = wait_for_run(Run.objects.get(pk=response.json()["run"]["id"]))

    assert run.status == "succeeded", run.error
    listed = api.get(messages_url(conversation)).json()["results"]
    assert [(m["role"], m["content"], m["run"]) for m in listed] == [
        ("user", "hello", run.pk),
        ("assistant", "Hi there!", run.pk),
    ]


def test_the_default_workflow_echoes_the_message_content(worker, api, user, default_workflow):
    conversation = ConversationFactory.create(owner=user)

    response = api.post(messages_url(conversation), {"content": "ping"}, format="json")
    run = wait_for_run(Run.objects.get(pk=response.json()["run"]["id"]))

    assert run.status == "succeeded", run.error
    assert run.output == {"content": "ping", "conversation_id": conversation.pk}
    listed = api.get(messages_url(conversation)).json()["results"]
    assert [(m["role"], m["content"]) for m in listed] == [("user", "ping"), ("assistant", "ping")]


def test_a_failed_run_adds_no_assistant_message(worker, api, user):
    conversation = ConversationFactory.create(owner=user)
    spec = {"skill": "fail", "args": {"message": "no luck"}}

    response = api.post(messages_url(conversation), {"content": "hello", "spec": spec}, format="json")
    run = wait_for_run(Run.objects.get(pk=response.json()["run"]["id"]))

    assert run.status == "failed"
    assert "no luck" in run.error
    assert [m["role"] for m in api.get(messages_url(conversation)).json()["results"]] == ["user"]
