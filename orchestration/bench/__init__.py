"""``manage.py bench``: agentsite against raw Celery, side by side, on real processes.

``shapes`` says what is measured and ``raw`` is the plain Celery side; ``child`` runs the
phases (``measure``) in an environment of its own (``stack``, ``cpu``). The method and
the latest figures: docs/performance.md, "The benchmark" and "Latest figures".
"""
