"""Token authentication: DRF's, its token read compiled once per process."""

from __future__ import annotations

from typing import Any

from django.utils.translation import gettext_lazy as _
from rest_framework import authentication, exceptions
from rest_framework.authtoken.models import Token

from orchestration.reads import ByKey

_TOKEN_WITH_USER = ByKey(Token, "key", related=("user",))


class TokenAuthentication(authentication.TokenAuthentication):
    """``Authorization: Token <key>``, as DRF's TokenAuthentication, with its token and user read by SQL compiled once.

    DRF compiles ``Token.objects.select_related("user").get(key=key)`` for
    every request; that compiling was 0.7 ms of the 6 ms the web spent
    creating a run (orchestration/reads.py, docs/performance.md).
    """

    def authenticate_credentials(self, key: str) -> tuple[Any, Token]:
        token = _TOKEN_WITH_USER.get(key)
        if token is None:
            raise exceptions.AuthenticationFailed(_("Invalid token."))
        if not token.user.is_active:
            raise exceptions.AuthenticationFailed(_("User inactive or deleted."))
        return (token.user, token)
