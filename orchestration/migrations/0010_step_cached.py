"""Step.cached: the step succeeded with an output from the skill result cache (skills/cache.py)."""

from __future__ import annotations

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("orchestration", "0009_workflow_name_per_owner"),
    ]

    operations = [
        migrations.AddField(
            model_name="step",
            name="cached",
            field=models.BooleanField(
                default=False,
                help_text="It succeeded with an output from the skill result cache: the skill was not called.",
            ),
        ),
    ]
