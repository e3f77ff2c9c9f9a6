from __future__ import annotations

from django.contrib import admin

from .models import Effect


@admin.register(Effect)
class EffectAdmin(admin.ModelAdmin):
    list_display = ["id", "key", "run_id", "created_at"]
    search_fields = ["key", "=run_id"]
