from __future__ import annotations

import factory
from django.contrib.auth.models import User
from rest_framework.authtoken.models import Token

from orchestration.models import Conversation, Message, Run, Step, Workflow


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


class RunFactory(factory.django.DjangoModelFactory[Run]):
    class Meta:
        model = Run

    owner = factory.SubFactory(UserFactory)
    conversation = factory.SubFactory(ConversationFactory, owner=factory.SelfAttribute("..owner"))
    spec = factory.LazyFunction(lambda: {"skill": "echo"})
    input = factory.LazyFunction(dict)


class StepFactory(factory.django.DjangoModelFactory[Step]):
    class Meta:
        model = Step

    run = factory.SubFactory(RunFactory)
    key = factory.Sequence(lambda n: f"step-{n}")
    path = "spec"
    skill = "echo"
    soft_time_limit = 5
    time_limit = 10
    queue = "default"


class MessageFactory(factory.django.DjangoModelFactory[Message]):
    class Meta:
        model = Message

    conversation = factory.SubFactory(ConversationFactory)
    role = "user"
    content = factory.Sequence(lambda n: f"message {n}")


def token_for(user: User) -> str:
    return Token.objects.get_or_create(user=user)[0].key
