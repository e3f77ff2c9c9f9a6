from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.http import HttpRequest

from .models import Article, Customer, Effect, IntentRule, Order, OrderItem, Payment


@admin.register(Effect)
class EffectAdmin(admin.ModelAdmin):
    list_display = ["id", "key", "run_id", "created_at"]
    search_fields = ["key", "=run_id"]


# --- Demo shop: what sql_query reads; shown, not edited (migration 0003_shop seeds it) ---


class ReadOnlyAdmin(admin.ModelAdmin):
    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


class OrderItemInline(admin.TabularInline):
    model = OrderItem
    extra = 0
    can_delete = False

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


class PaymentInline(OrderItemInline):
    model = Payment  # type: ignore[assignment]


@admin.register(Customer)
class CustomerAdmin(ReadOnlyAdmin):
    list_display = ["id", "email", "name", "created_at"]
    search_fields = ["email", "name"]


@admin.register(Order)
class OrderAdmin(ReadOnlyAdmin):
    list_display = ["id", "customer", "status", "total", "currency", "placed_at"]
    list_filter = ["status"]
    search_fields = ["=id", "customer__email"]
    inlines = [OrderItemInline, PaymentInline]


@admin.register(Payment)
class PaymentAdmin(ReadOnlyAdmin):
    list_display = ["reference", "order", "amount", "status", "method", "card_last4", "created_at"]
    list_filter = ["status", "method"]
    search_fields = ["reference", "=order__id"]


@admin.register(IntentRule)
class IntentRuleAdmin(admin.ModelAdmin):
    """The rules classify_intent tries first; a change takes effect at the next message."""

    list_display = ["id", "pattern", "intent", "priority", "enabled", "note"]
    list_display_links = ["id", "pattern"]
    list_editable = ["priority", "enabled"]
    list_filter = ["intent", "enabled"]
    search_fields = ["pattern", "note"]


@admin.register(Article)
class ArticleAdmin(admin.ModelAdmin):
    list_display = ["title", "slug", "category", "enabled", "updated_at"]
    list_filter = ["category", "enabled"]
    list_editable = ["enabled"]
    search_fields = ["title", "slug", "tags", "body"]
    prepopulated_fields = {"slug": ["title"]}
