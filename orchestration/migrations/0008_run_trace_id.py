"""The trace id of the request that started a run (tracing, issue 5)."""

from __future__ import annotations

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("orchestration", "0007_webhooks"),
    ]

    operations = [
        migrations.AddField(
            model_name="run",
            name="trace_id",
            field=models.CharField(
                blank=True,
                default="",
                help_text=(
                    "The OpenTelemetry trace of the request that started it (32 hex digits); blank when tracing is off."
                ),
                max_length=32,
            ),
        ),
    ]
