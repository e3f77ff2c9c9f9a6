"""The chaos suite: fault injection against real processes (docs/chaos.md, "Isolation").

``processes`` starts and stops processes and servers, ``api`` is a small HTTP
client, ``stack`` one scenario's running service, ``scenarios`` the faults and
what each expects, ``outcome`` the figures a scenario reports.
"""
