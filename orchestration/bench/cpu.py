"""CPU time spent serving runs, by process role: where a run's cost goes, and a raw canvas's.

A benchmark on a shared machine is bounded by the CPU all its processes use
together, so the throughput ratio is about the ratio of CPU per run (the
web, the workers, PostgreSQL, Redis and the client that sends the runs).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from functools import partial

import psutil

from orchestration.chaos.processes import group_members

# Server processes shared by everything on the machine, by name.
SERVERS = {"postgresql": ("postgres",), "redis": ("redis-server", "valkey-server")}


class CpuMeter:
    """CPU seconds (user + system) of each role's processes; a role is a callable listing its pids."""

    def __init__(self, roles: dict[str, Callable[[], Iterable[int]]]) -> None:
        self.roles = roles

    @classmethod
    def for_groups(cls, groups: dict[str, int]) -> CpuMeter:
        """Roles for process groups (role: group id), the servers, and this process (the client)."""
        roles: dict[str, Callable[[], Iterable[int]]] = {
            role: partial(group_members, pgid) for role, pgid in groups.items()
        }
        roles.update({role: partial(_named, names) for role, names in SERVERS.items()})
        roles["client"] = lambda: [os.getpid()]
        return cls(roles)

    def read(self) -> dict[str, dict[int, float]]:
        return {role: {pid: _cpu_seconds(pid) for pid in pids()} for role, pids in self.roles.items()}

    @staticmethod
    def used(before: dict[str, dict[int, float]], after: dict[str, dict[int, float]]) -> dict[str, float]:
        """CPU seconds each role used between two readings (a process that started meanwhile counts from 0)."""
        return {
            role: sum(seconds - before.get(role, {}).get(pid, 0.0) for pid, seconds in pids.items())
            for role, pids in after.items()
        }


def _named(names: tuple[str, ...]) -> list[int]:
    return [p.pid for p in psutil.process_iter(["name"]) if (p.info["name"] or "").startswith(names)]


def _cpu_seconds(pid: int) -> float:
    try:
        times = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return 0.0
    return float(times.user + times.system)
