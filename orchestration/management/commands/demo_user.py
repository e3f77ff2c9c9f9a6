"""``manage.py demo_user``: a superuser and an API token to try the service with.

Idempotent: a second run updates the same user and prints the same token.
Without a password (``--password`` or ``DEMO_PASSWORD``) it sets a random one.
"""

from __future__ import annotations

import os
import secrets
from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandParser
from django.db import transaction
from rest_framework.authtoken.models import Token


class Command(BaseCommand):
    help = "Create or update a demo superuser with an API token, and print its credentials."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--username", default="demo")
        parser.add_argument("--password", help="default: $DEMO_PASSWORD, else a random one")

    def handle(self, *args: Any, username: str, password: str | None, **options: Any) -> None:
        password = password or os.environ.get("DEMO_PASSWORD") or secrets.token_urlsafe(12)
        with transaction.atomic():
            user, _ = get_user_model().objects.get_or_create(username=username)
            user.is_staff = user.is_superuser = user.is_active = True
            user.set_password(password)
            user.save()
            token, _ = Token.objects.get_or_create(user=user)
        self.stdout.write(f"username: {username}\npassword: {password}\ntoken: {token.key}")
