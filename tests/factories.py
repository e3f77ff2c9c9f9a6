from __future__ import annotations

import factory
from django.contrib.auth.models import User
from rest_framework.authtoken.models import Token

from orchestration.models import Conversation, Workflow


class UserFactory(factory.django.DjangoModelFactory[User]):
    class Meta:
        model = User

    username = factory.Sequence(lambda n: f"user{n}")
    email = factory.LazyAttribute(lambda u: f"{u.username}@example.com")
    password = factory.django.Password("password")


class ConversationFactory(factory.django.DjangoModelFactory[Conversation]):
    class Meta:
        model = Conversation

    owner = factory.SubFactory(UserFactory)
    title = factory.Sequence(lambda n: f"conversation {n}")


class WorkflowFactory(factory.django.DjangoModelFactory[Workflow]):
    class Meta:
        model = Workflow

    name = factory.Sequence(lambda n: f"workflow-{n}")
    spec = factory.LazyFunction(lambda: {"skill": "echo"})
    owner = None


def token_for(user: User) -> str:
    return Token.objects.get_or_create(user=user)[0].key
