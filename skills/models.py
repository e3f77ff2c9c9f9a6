"""Diagnostics records written by the built-in skills."""

from __future__ import annotations

from django.db import models


class Effect(models.Model):
    """One application of the ``effect`` skill's side effect (or one call of ``counted_echo``).

    One row per call that got through, never deduplicated: a step whose
    effect was applied twice shows up as two rows with the same key. The
    chaos suite counts them.
    """

    key = models.CharField(max_length=200, db_index=True, help_text="The step's idempotency key.")
    run_id = models.BigIntegerField()
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return self.key


class Reservation(models.Model):
    """What the ``reserve`` diagnostics skill holds until ``release`` (its compensation) deletes it."""

    key = models.CharField(max_length=200, unique=True, help_text="The reserving step's idempotency key.")
    run_id = models.BigIntegerField()
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return self.key
