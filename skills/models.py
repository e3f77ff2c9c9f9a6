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


# --- Knowledge base (skills/support/knowledge.py: the knowledge_search skill) ---


class ArticleCategory(models.TextChoices):
    BILLING = "billing"
    ORDERS = "orders"
    SHIPPING = "shipping"
    RETURNS = "returns"
    ACCOUNT = "account"
    TECHNICAL = "technical"
    PRODUCTS = "products"
    SALES = "sales"
    POLICIES = "policies"
    GENERAL = "general"


class Article(models.Model):
    """A help-centre article that ``knowledge_search`` finds and ``compose_reply`` quotes.

    The full-text index follows every save and delete at once: on SQLite an
    FTS5 table kept in step by triggers, on PostgreSQL a GIN index over the
    weighted title/tags/body vector (migration 0005_article).
    """

    slug = models.SlugField(max_length=100, unique=True)
    title = models.CharField(max_length=200)
    category = models.CharField(max_length=20, choices=ArticleCategory.choices, default=ArticleCategory.GENERAL)
    body = models.TextField(help_text="The answer, as quoted to customers (plain text).")
    tags = models.CharField(max_length=300, blank=True, help_text="Comma-separated words customers use for this.")
    enabled = models.BooleanField(default=True, help_text="Disabled articles are never found.")
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["category", "slug"]

    def __str__(self) -> str:
        return self.title


# --- End of knowledge base ---
