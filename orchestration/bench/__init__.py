"""``manage.py bench``: agentsite against raw Celery, side by side, on real processes.

``shapes`` says what is measured and ``raw`` is the plain Celery side;
``child`` runs the whole benchmark in an environment of its own (its own
database and Redis database) and ``report`` prints it. docs/performance.md
has the method and the latest figures.
"""
