"""Step.wait: what a waiting step's skill asked for (human in the loop, orchestration/waiting.py)."""

from __future__ import annotations

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("orchestration", "0010_step_cached"),
    ]

    operations = [
        migrations.AddField(
            model_name="step",
            name="wait",
            field=models.JSONField(
                blank=True,
                help_text="What its skill asked to wait for (prompt, timeout_at, default): the step waits while it "
                "is running with this set, and succeeds with the payload it is resumed with "
                "(orchestration/waiting.py).",
                null=True,
            ),
        ),
    ]
