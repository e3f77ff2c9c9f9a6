"""Workflow names unique per owner (and among the shared ones), not across all users.

A name unique across users told a user, by refusing it, that someone else had
a private workflow of that name.
"""

from __future__ import annotations

from django.conf import settings
from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("orchestration", "0008_run_trace_id"),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [
        migrations.AlterField(
            model_name="workflow",
            name="name",
            field=models.SlugField(db_index=False, max_length=100),
        ),
        migrations.AddConstraint(
            model_name="workflow",
            constraint=models.UniqueConstraint(fields=("name", "owner"), name="workflow_name_per_owner"),
        ),
        migrations.AddConstraint(
            model_name="workflow",
            constraint=models.UniqueConstraint(
                condition=models.Q(("owner__isnull", True)), fields=("name",), name="workflow_shared_name_uniq"
            ),
        ),
    ]
