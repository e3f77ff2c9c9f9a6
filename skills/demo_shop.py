"""The demo shop's data: what ``sql_query`` finds out of the box (seeded by migration 0003_shop).

Ten customers, orders 1031 to 1050, their items and payments; order 1042 (``CHARGED_TWICE``) has two
identical captured payments. See docs/skills.md, "sql_query".
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

CHARGED_TWICE = 1042

# (email, name)
CUSTOMERS = [
    ("jane@example.com", "Jane Doe"),
    ("arjun.patel@example.org", "Arjun Patel"),
    ("li.wei@example.net", "Li Wei"),
    ("maria.garcia@example.com", "Maria Garcia"),
    ("tom.becker@example.org", "Tom Becker"),
    ("amina.okafor@example.net", "Amina Okafor"),
    ("sofia.rossi@example.com", "Sofia Rossi"),
    ("kenji.sato@example.org", "Kenji Sato"),
    ("olga.ivanova@example.net", "Olga Ivanova"),
    ("sam.taylor@example.com", "Sam Taylor"),
]

# sku: (description, unit price)
PRODUCTS = {
    "MUG-01": ("Ceramic mug, 350 ml", Decimal("12.50")),
    "TEE-M": ("Organic cotton T-shirt, M", Decimal("24.00")),
    "BAG-02": ("Canvas tote bag", Decimal("18.90")),
    "LAMP-3": ("Desk lamp, LED", Decimal("49.99")),
    "BOOK-7": ("Notebook, dotted, A5", Decimal("9.75")),
    "HEAD-5": ("Wireless headphones", Decimal("89.00")),
}

# order id: (customer index, status, [(sku, quantity)], payment outcome)
# outcome: "captured", "failed-then-captured", "refunded", "none" (not paid yet), "twice" (charged twice)
ORDERS: dict[int, tuple[int, str, list[tuple[str, int]], str]] = {
    1031: (1, "delivered", [("MUG-01", 2)], "captured"),
    1032: (2, "delivered", [("TEE-M", 1), ("BAG-02", 1)], "captured"),
    1033: (3, "shipped", [("LAMP-3", 1)], "captured"),
    1034: (0, "delivered", [("BOOK-7", 3)], "captured"),
    1035: (4, "cancelled", [("HEAD-5", 1)], "refunded"),
    1036: (5, "delivered", [("MUG-01", 1), ("BOOK-7", 1)], "failed-then-captured"),
    1037: (6, "shipped", [("TEE-M", 2)], "captured"),
    1038: (7, "paid", [("BAG-02", 2)], "captured"),
    1039: (8, "delivered", [("LAMP-3", 1), ("MUG-01", 1)], "captured"),
    1040: (9, "pending", [("HEAD-5", 1)], "none"),
    1041: (1, "shipped", [("BOOK-7", 2)], "captured"),
    1042: (0, "shipped", [("HEAD-5", 1), ("MUG-01", 1)], "twice"),
    1043: (2, "paid", [("TEE-M", 1)], "captured"),
    1044: (3, "refunded", [("LAMP-3", 1)], "refunded"),
    1045: (4, "delivered", [("BAG-02", 1), ("BOOK-7", 2)], "captured"),
    1046: (5, "shipped", [("MUG-01", 4)], "captured"),
    1047: (6, "pending", [("BOOK-7", 1)], "none"),
    1048: (7, "paid", [("HEAD-5", 2)], "captured"),
    1049: (8, "delivered", [("TEE-M", 1), ("LAMP-3", 1)], "captured"),
    1050: (9, "paid", [("BAG-02", 1)], "captured"),
}

START = datetime(2026, 10, 1, 9, 0, tzinfo=UTC)


def total_of(items: list[tuple[str, int]]) -> Decimal:
    return sum((PRODUCTS[sku][1] * quantity for sku, quantity in items), Decimal("0.00"))


def seed(apps: Any, schema_editor: Any = None) -> None:
    """Create the demo shop's rows (a RunPython forward function: ``apps`` gives the historical models)."""
    Customer = apps.get_model("skills", "Customer")
    Order = apps.get_model("skills", "Order")
    OrderItem = apps.get_model("skills", "OrderItem")
    Payment = apps.get_model("skills", "Payment")
    customers = [
        Customer.objects.create(email=email, name=name, created_at=START - timedelta(days=90 - 7 * index))
        for index, (email, name) in enumerate(CUSTOMERS)
    ]
    for number, (customer, status, items, outcome) in ORDERS.items():
        placed_at = START + timedelta(days=number - 1031, hours=number % 7)
        order = Order.objects.create(
            id=number, customer=customers[customer], status=status, total=total_of(items), placed_at=placed_at
        )
        for sku, quantity in items:
            description, price = PRODUCTS[sku]
            OrderItem.objects.create(order=order, sku=sku, description=description, quantity=quantity, unit_price=price)
        for index, (amount_sign, payment_status) in enumerate(_payments(outcome)):
            Payment.objects.create(
                order=order,
                amount=amount_sign * order.total,
                status=payment_status,
                method="card",
                card_last4=f"{4242 + customer:04d}",
                reference=f"ch_{number}_{index + 1}",
                created_at=placed_at + timedelta(minutes=index + 1),
            )
    _reset_sequences([Customer, Order, OrderItem, Payment])


def _reset_sequences(models: list[Any]) -> None:
    """The orders were given their ids: PostgreSQL's sequences must go past them (a no-op on SQLite)."""
    from django.core.management.color import no_style
    from django.db import connections

    connection = connections[models[0].objects.db]
    statements = connection.ops.sequence_reset_sql(no_style(), models)
    if statements:
        with connection.cursor() as cursor:
            for statement in statements:
                cursor.execute(statement)


def unseed(apps: Any, schema_editor: Any = None) -> None:
    """The reverse of ``seed`` (the tables are dropped right after anyway)."""
    for model in ("Payment", "OrderItem", "Order", "Customer"):
        apps.get_model("skills", model).objects.all().delete()


def _payments(outcome: str) -> list[tuple[int, str]]:
    """(sign of the amount, status) of each payment an outcome stands for, in order."""
    return {
        "captured": [(1, "captured")],
        "failed-then-captured": [(1, "failed"), (1, "captured")],
        "refunded": [(1, "captured"), (-1, "refunded")],
        "none": [],
        "twice": [(1, "captured"), (1, "captured")],
    }[outcome]
