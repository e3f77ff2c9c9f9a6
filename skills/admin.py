from __future__ import annotations

from django.contrib import admin

from .models import Article, Effect


@admin.register(Effect)
class EffectAdmin(admin.ModelAdmin):
    list_display = ["id", "key", "run_id", "created_at"]
    search_fields = ["key", "=run_id"]


@admin.register(Article)
class ArticleAdmin(admin.ModelAdmin):
    list_display = ["title", "slug", "category", "enabled", "updated_at"]
    list_filter = ["category", "enabled"]
    list_editable = ["enabled"]
    search_fields = ["title", "slug", "tags", "body"]
    prepopulated_fields = {"slug": ["title"]}
