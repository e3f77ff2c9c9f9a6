from __future__ import annotations

from django.contrib import admin

from .models import Effect, IntentRule


@admin.register(Effect)
class EffectAdmin(admin.ModelAdmin):
    list_display = ["id", "key", "run_id", "created_at"]
    search_fields = ["key", "=run_id"]


@admin.register(IntentRule)
class IntentRuleAdmin(admin.ModelAdmin):
    """The rules classify_intent tries first; a change takes effect at the next message."""

    list_display = ["id", "pattern", "intent", "priority", "enabled", "note"]
    list_display_links = ["id", "pattern"]
    list_editable = ["priority", "enabled"]
    list_filter = ["intent", "enabled"]
    search_fields = ["pattern", "note"]
