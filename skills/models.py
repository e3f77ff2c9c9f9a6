"""Diagnostics records written by the built-in skills, and the rules of classify_intent."""

from __future__ import annotations

from django.core.exceptions import ValidationError
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


# --- classify_intent: the rules its first stage matches (skills/support/rules.py) ---


class Intent(models.TextChoices):
    """What a support ticket is about (the ticket's ``intent``)."""

    FAQ = "faq", "FAQ (how-to, policies, order status)"
    TECHNICAL = "technical", "Technical (logins, the app, the site)"
    BILLING = "billing", "Billing (charges, refunds, invoices)"
    COMPLAINT = "complaint", "Complaint"
    SALES = "sales", "Sales (products, discounts, bulk)"
    GENERAL = "general", "General (greetings, chit-chat)"


class IntentRule(models.Model):
    """A regular expression that, when it matches a customer's message, decides its intent (confidence 0.95).

    Enabled rules are tried highest ``priority`` first (then oldest first);
    the first that matches wins. Matching ignores case. Keep patterns precise:
    a rule's answer is trusted over the statistical model's.
    """

    pattern = models.CharField(
        max_length=500, help_text="A Python regular expression, matched anywhere in the message, ignoring case."
    )
    intent = models.CharField(max_length=20, choices=Intent.choices)
    priority = models.IntegerField(default=100, help_text="Higher is tried first.")
    enabled = models.BooleanField(default=True)
    note = models.CharField(max_length=200, blank=True, help_text="Why this rule exists, an example it catches.")

    class Meta:
        ordering = ["-priority", "id"]

    def __str__(self) -> str:
        return f"{self.pattern} -> {self.intent}"

    def clean(self) -> None:
        from .support.rules import pattern_problem

        if problem := pattern_problem(self.pattern):
            raise ValidationError({"pattern": problem})
