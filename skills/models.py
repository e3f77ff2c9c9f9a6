"""Diagnostics records written by the built-in skills, and the rules of classify_intent."""

from __future__ import annotations

from django.core.exceptions import ValidationError
from django.db import models

from .patterns import pattern_problem


class Effect(models.Model):
    """One application of the ``effect`` skill's side effect (or one call of ``counted_echo``).

    Never deduplicated: an effect applied twice is two rows with the same key (the chaos suite counts them).
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


# --- Demo shop ----------------------------------------------------------------
# What the ``sql_query`` skill (skills/support/sql.py) reads out of the box:
# customers, their orders, the items and the payments. Seeded by migration
# 0003_shop from skills/demo_shop.py; order 1042 was charged twice.


class Customer(models.Model):
    email = models.EmailField(unique=True)
    name = models.CharField(max_length=200)
    created_at = models.DateTimeField()

    class Meta:
        db_table = "shop_customer"

    def __str__(self) -> str:
        return self.email


class Order(models.Model):
    """An order; its id is the number customers quote ("order 1042")."""

    class Status(models.TextChoices):
        PENDING = "pending"
        PAID = "paid"
        SHIPPED = "shipped"
        DELIVERED = "delivered"
        CANCELLED = "cancelled"
        REFUNDED = "refunded"

    customer = models.ForeignKey(Customer, on_delete=models.PROTECT, related_name="orders")
    status = models.CharField(max_length=20, choices=Status.choices)
    total = models.DecimalField(max_digits=10, decimal_places=2)
    currency = models.CharField(max_length=3, default="USD")
    placed_at = models.DateTimeField()

    class Meta:
        db_table = "shop_order"

    def __str__(self) -> str:
        return f"order {self.pk}"


class OrderItem(models.Model):
    order = models.ForeignKey(Order, on_delete=models.CASCADE, related_name="items")
    sku = models.CharField(max_length=40)
    description = models.CharField(max_length=200)
    quantity = models.PositiveIntegerField()
    unit_price = models.DecimalField(max_digits=10, decimal_places=2)

    class Meta:
        db_table = "shop_orderitem"

    def __str__(self) -> str:
        return f"{self.quantity} x {self.sku}"


class Payment(models.Model):
    """One charge (or refund, a negative amount) against an order."""

    class Status(models.TextChoices):
        AUTHORIZED = "authorized"
        CAPTURED = "captured"
        FAILED = "failed"
        REFUNDED = "refunded"

    order = models.ForeignKey(Order, on_delete=models.CASCADE, related_name="payments")
    amount = models.DecimalField(max_digits=10, decimal_places=2)
    status = models.CharField(max_length=20, choices=Status.choices)
    method = models.CharField(max_length=20, help_text="card, paypal...")
    card_last4 = models.CharField(max_length=4, blank=True)
    reference = models.CharField(max_length=40, unique=True, help_text="The payment provider's id of the charge.")
    created_at = models.DateTimeField()

    class Meta:
        db_table = "shop_payment"

    def __str__(self) -> str:
        return self.reference


# --- End of the demo shop -------------------------------------------------------

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

    Enabled rules are tried highest ``priority`` first, then oldest first; the first that matches wins.
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
        if problem := pattern_problem(self.pattern):
            raise ValidationError({"pattern": problem})


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

    Its full-text index (migration 0005_article) follows every save and delete at once.
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
