from __future__ import annotations

from celery import signals
from django.apps import AppConfig
from django.conf import settings

from agentsite import metrics


class OrchestrationConfig(AppConfig):
    """The engine. Its wiring is all here: what follows a run's end, and the hooks of its Celery processes."""

    name = "orchestration"

    def ready(self) -> None:
        # Not at the top: these import the models, which are loaded after this module.
        from . import broker, budget, double_texting, saga, transitions, webhooks, worker

        # What follows a run's end, in the transaction that ended it.
        transitions.run_ended.connect(saga.on_run_ended)
        transitions.run_ended.connect(webhooks.on_run_ended)
        transitions.run_ended.connect(double_texting.on_run_ended)
        transitions.compensation_ended.connect(saga.on_compensation_ended)
        # Step messages as they are published.
        signals.before_task_publish.connect(broker.mark_step_delivery)
        signals.before_task_publish.connect(budget.cap_step_message)
        # Workers: the queues they consume, and a step's life around its task.
        signals.celeryd_init.connect(broker.note_chosen_queues)
        signals.celeryd_after_setup.connect(broker.consume_routed_queues)
        signals.worker_process_init.connect(worker.listen_for_finish_then_exit)
        signals.task_prerun.connect(worker.enter_step)
        signals.task_prerun.connect(budget.restore_pool_soft_limit)
        signals.task_postrun.connect(worker.leave_step)
        signals.task_revoked.connect(worker.fail_revoked_step)
        # GET /metrics reads the queues' depth and age from the broker at each scrape.
        metrics.read_at_scrape(lambda: metrics.QueueCollector(settings.CELERY_BROKER_URL, broker.queues()))
