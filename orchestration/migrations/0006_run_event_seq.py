"""Number each run's events (RunEvent.seq) for the event stream's resume point."""

from __future__ import annotations

from typing import Any

from django.db import migrations, models
from django.db.models import Count


def number_existing_events(apps: Any, schema_editor: Any) -> None:
    Run = apps.get_model("orchestration", "Run")
    RunEvent = apps.get_model("orchestration", "RunEvent")
    counts = RunEvent.objects.values("run_id").annotate(n=Count("id")).values_list("run_id", "n")
    for run_id, count in counts.iterator():
        events = list(RunEvent.objects.filter(run_id=run_id).order_by("id").only("id"))
        for seq, event in enumerate(events, start=1):
            event.seq = seq
        RunEvent.objects.bulk_update(events, ["seq"], batch_size=500)
        Run.objects.filter(pk=run_id).update(last_event_seq=count)


class Migration(migrations.Migration):
    dependencies = [
        ("orchestration", "0005_stored_task_result_proxy"),
    ]

    operations = [
        migrations.AddField(
            model_name="run",
            name="last_event_seq",
            field=models.PositiveIntegerField(default=0, help_text="The seq of its latest RunEvent."),
        ),
        migrations.AddField(
            model_name="runevent",
            name="seq",
            field=models.PositiveIntegerField(null=True),
        ),
        migrations.RunPython(number_existing_events, migrations.RunPython.noop, elidable=True),
        migrations.AlterField(
            model_name="runevent",
            name="seq",
            field=models.PositiveIntegerField(),
        ),
        migrations.AddConstraint(
            model_name="runevent",
            constraint=models.UniqueConstraint(fields=("run", "seq"), name="runevent_run_seq_uniq"),
        ),
        migrations.AlterField(
            model_name="runevent",
            name="run",
            field=models.ForeignKey(
                db_index=False,
                on_delete=models.deletion.CASCADE,
                related_name="events",
                to="orchestration.run",
            ),
        ),
    ]
