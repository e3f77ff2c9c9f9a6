"""Reads compiled once per process (orchestration/reads.py) give what the ORM's queryset gives."""

from __future__ import annotations

from typing import Any

import pytest
from django.db import connection
from django.forms.models import model_to_dict
from django.test.utils import CaptureQueriesContext
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from orchestration.models import Conversation, Run
from orchestration.reads import ByKey

from .factories import ConversationFactory, UserFactory, token_for

pytestmark = pytest.mark.django_db


def fields(row: Any) -> dict[str, Any]:
    """Every concrete field's value, as the row holds it (types included)."""
    return {field.attname: getattr(row, field.attname) for field in type(row)._meta.concrete_fields}


def test_a_token_and_its_user_are_what_select_related_gives():
    user = UserFactory.create(first_name="Zoë", is_staff=True)
    user.last_login = user.date_joined
    user.save()
    key = token_for(user)
    theirs = Token.objects.select_related("user").get(key=key)

    with CaptureQueriesContext(connection) as queries:
        ours = ByKey(Token, "key", related=("user",)).get(key)
        assert ours is not None
        assert fields(ours) == fields(theirs)
        assert fields(ours.user) == fields(theirs.user)
    assert len(queries) == 1
    assert not ours._state.adding
    assert ours.user.check_password("password")


def test_a_conversation_by_pk_with_its_owner():
    conversation = ConversationFactory.create(state={"lang": "fr", "n": [1, 2]}, webhook_url="https://example.com/h")
    read = ByKey(Conversation, "pk", related=("owner",))

    ours = read.get(str(conversation.pk))  # as a URL gives it

    assert ours is not None
    theirs = Conversation.objects.select_related("owner").get(pk=conversation.pk)
    assert model_to_dict(ours) == model_to_dict(theirs)
    assert fields(ours) == fields(theirs)
    assert fields(ours.owner) == fields(theirs.owner)


def test_no_row_is_none_and_a_value_the_field_does_not_take_raises_as_the_orm_does():
    read = ByKey(Conversation, "pk", related=("owner",))

    assert read.get(123456789) is None
    assert read.get(str(2**70)) is None  # no column holds it: the ORM's DoesNotExist, not the driver's OverflowError
    with pytest.raises(ValueError, match="expected a number but got 'x'"):
        Conversation.objects.get(pk="x")
    with pytest.raises(ValueError, match="expected a number but got 'x'"):
        read.get("x")


def test_a_foreign_key_that_can_be_null_is_refused():
    read = ByKey(Run, "pk", related=("conversation",))

    with pytest.raises(ValueError, match="cannot be null"):
        read.get(1)


def test_the_api_refuses_an_unknown_token_and_an_inactive_user():
    user = UserFactory.create()
    key = token_for(user)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {key}x")
    assert client.get("/api/conversations/").json() == {"detail": "Invalid token."}

    client.credentials(HTTP_AUTHORIZATION=f"Token {key}")
    assert client.get("/api/conversations/").status_code == 200
    user.is_active = False
    user.save()
    response = client.get("/api/conversations/")
    assert (response.status_code, response.json()) == (401, {"detail": "User inactive or deleted."})


def test_a_conversation_of_another_user_is_not_found_but_staff_see_it(api: APIClient, staff_api: APIClient):
    conversation = ConversationFactory.create()
    body = {"spec": {"skill": "echo"}, "input": {}}

    response = api.post(f"/api/conversations/{conversation.pk}/runs/", body, format="json")
    assert (response.status_code, response.json()) == (404, {"detail": "No Conversation matches the given query."})
    assert api.get(f"/api/conversations/{conversation.pk}/").status_code == 404
    assert staff_api.get(f"/api/conversations/{conversation.pk}/").json()["id"] == conversation.pk


@pytest.mark.skipif(connection.vendor != "postgresql", reason="prepared statements are PostgreSQL's")
def test_postgresql_prepares_a_read_its_connection_runs_again_and_again():
    """DATABASE_PREPARED_STATEMENTS (default on): a statement run five times is prepared, then parsed no more."""
    conversation = ConversationFactory.create()
    read = ByKey(Conversation, "pk", related=("owner",))

    for _ in range(6):
        assert read.get(conversation.pk) is not None

    with connection.cursor() as cursor:
        cursor.execute("SELECT statement FROM pg_prepared_statements WHERE NOT from_sql")
        prepared = [statement for (statement,) in cursor.fetchall()]
    assert any("orchestration_conversation" in statement and "$1" in statement for statement in prepared), prepared
