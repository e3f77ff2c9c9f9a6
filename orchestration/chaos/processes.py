"""Starting and stopping the processes a scenario runs: services, Redis, PostgreSQL.

Every process starts in a session of its own, listed in the scenario's ``pids`` file;
see docs/chaos.md, "Isolation".
"""

from __future__ import annotations

import contextlib
import logging
import os
import pwd
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import IO, Any
from urllib.parse import quote

import psycopg
import redis

PIDS_FILE = "pids"


class SkipScenario(Exception):
    """The scenario cannot run on this machine; the message says why."""


class ScenarioError(Exception):
    """The scenario could not be carried out (a process did not start, ...)."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def driver_setup(log: logging.Logger) -> None:
    """Set up a driver process (a scenario's or the benchmark's): a timestamped narrative on stdout, through a
    handler of its own (Django's logging setup replaces the root's); SIGINT and SIGTERM unwind through the
    Supervisor (SystemExit), and a further signal is ignored so that it cannot cut the teardown short.
    """
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    signal.signal(signal.SIGINT, _stop_on_signal)
    signal.signal(signal.SIGTERM, _stop_on_signal)


def _stop_on_signal(signum: int, frame: FrameType | None) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise SystemExit(128 + signum)


def run_driver(
    command: list[str], cwd: Path, directory: Path, log_name: str, teardown: float = 60
) -> tuple[int, list[str]]:
    """Run a driver process with its output in ``directory/log_name``; its exit code, and what it left running (killed).

    On a Ctrl-C or SIGTERM here the driver is told to stop and gets ``teardown`` seconds before it is killed.
    """
    with (directory / log_name).open("wb") as log:
        child = subprocess.Popen(command, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
        try:
            child.wait()
        except BaseException:
            child.terminate()
            try:
                child.wait(teardown)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
            raise
        finally:
            leftovers = reap_leftovers(directory)
    return child.returncode, leftovers


def database_url(db: dict[str, Any]) -> str:
    """A DATABASE_URL for a Django database settings dict (SQLite or PostgreSQL)."""
    if db["ENGINE"].endswith("sqlite3"):
        return f"sqlite:///{db['NAME']}"
    auth = quote(db["USER"] or "", safe="")
    if db.get("PASSWORD"):
        auth += ":" + quote(db["PASSWORD"], safe="")
    return f"postgres://{auth}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}"


def service_env(redis_url: str, database_url: str) -> dict[str, str]:
    """This environment, pointed at a Redis, a database and a free port of its own.

    For the processes a scenario or the benchmark starts, and for the driver itself (set before ``django.setup()``).
    """
    venv_bin = str(Path(sys.executable).parent)
    return {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "agentsite.settings",
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "CELERY_BROKER_URL": redis_url,
        "PORT": str(free_port()),
        "WEB_ADDRESS": "127.0.0.1",
        "ALLOWED_HOSTS": "127.0.0.1,localhost",
        "SECRET_KEY": secrets.token_urlsafe(32),
        "DEBUG": "0",
        "SENTRY_DSN": "",
        "PYTHONUNBUFFERED": "1",
        "PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}",
        # One user drives the API far faster than its run-creation rate: no throttling.
        "THROTTLE_ANON_RATE": "",
        "THROTTLE_USER_RATE": "",
        "THROTTLE_RUN_CREATE_RATE": "",
        # Their metrics' files apart from those of a service running from this checkout.
        "PROMETHEUS_MULTIPROC_DIR": str(Path(__file__).resolve().parents[2] / "var" / "prometheus-services"),
    }


def procfile_command(procfile: Path, name: str) -> str:
    """The command of the Procfile's ``name:`` line."""
    for line in procfile.read_text().splitlines():
        label, _, command = line.partition(":")
        if label.strip() == name and command.strip():
            return command.strip()
    raise ScenarioError(f"{procfile} has no {name}: line")


def kill_group(pgid: int, sig: signal.Signals = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


def reap_leftovers(directory: Path) -> list[str]:
    """SIGKILL every process group listed in ``directory``'s pids file that is still up a few seconds on."""
    pids = directory / PIDS_FILE
    if not pids.exists():
        return []
    reaped = []
    for line in pids.read_text().splitlines():
        pgid, _, name = line.partition(" ")
        if not _group_ends(int(pgid), timeout=3):
            kill_group(int(pgid))
            reaped.append(f"{name} ({pgid})")
    return reaped


class Supervisor(contextlib.ExitStack):
    """Owns what a scenario starts: on exit, stops it all, last started first."""

    def __init__(self, directory: Path) -> None:
        super().__init__()
        self.directory = directory

    def log(self, name: str) -> IO[bytes]:
        """The scenario's ``name.log``, opened for appending (a restart adds to it)."""
        return self.enter_context((self.directory / f"{name}.log").open("ab"))

    def record(self, pgid: int, name: str) -> None:
        with (self.directory / PIDS_FILE).open("a") as pids:
            pids.write(f"{pgid} {name}\n")

    def start(self, name: str, argv: list[str], env: dict[str, str], cwd: Path) -> Service:
        """Start a process that is stopped on exit."""
        service = self.spawn(name, argv, env, cwd)
        self.callback(service.stop)
        return service

    def spawn(self, name: str, argv: list[str], env: dict[str, str], cwd: Path) -> Service:
        """Start a process that the caller stops (it is still in the pids file)."""
        service = Service(name, argv, env, cwd, self.log(name))
        self.record(service.pid, name)
        return service


class Service:
    """A process in its own session whose output goes to a log file."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], cwd: Path, log: IO[bytes]) -> None:
        self.name = name
        self.process = subprocess.Popen(
            argv,
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def wait(self, timeout: float) -> bool:
        """Whether the process exited within ``timeout`` seconds."""
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        return True

    def stop(self, timeout: float = 10) -> None:
        """SIGTERM the group, SIGKILL it after ``timeout``; then kill any straggler of the group."""
        if self.alive():
            kill_group(self.pid, signal.SIGTERM)
            if not self.wait(timeout):
                kill_group(self.pid)
                self.process.wait()
        kill_group(self.pid)


def procfile_service(
    supervisor: Supervisor, name: str, command: str, extra: list[str], env: dict[str, str], cwd: Path
) -> Service:
    """Start a Procfile command (expanded by bash, as honcho does) with ``extra`` arguments appended."""
    line = f"exec {command} {shlex.join(extra)}"
    return supervisor.start(name, ["bash", "-c", line], env, cwd)


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.1) -> bool:
    """Poll ``predicate`` until it holds (True) or ``timeout`` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


class RedisServer:
    """The scenario's own redis-server: no persistence, so a restart loses every message."""

    def __init__(self, supervisor: Supervisor, directory: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise ScenarioError("redis-server is not on PATH")
        self.supervisor = supervisor
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        directory.mkdir(parents=True, exist_ok=True)
        self.argv = [binary, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "", "--appendonly", "no"]
        self.argv += ["--dir", str(directory)]
        self.service: Service | None = None
        # Registered once: a restarted server still stops after everything started after the first.
        supervisor.callback(self.stop)

    def start(self) -> None:
        self.service = self.supervisor.spawn("redis", self.argv, dict(os.environ), Path.cwd())
        if not wait_until(self.answers, timeout=10):
            raise ScenarioError(f"redis-server did not answer on port {self.port}")

    def answers(self) -> bool:
        try:
            return bool(redis.Redis.from_url(self.url, socket_connect_timeout=0.5).ping())
        except redis.RedisError:
            return False

    def stop(self) -> None:
        if self.service is not None:
            self.service.stop()

    def shutdown(self) -> None:
        """SHUTDOWN NOSAVE, and wait for the process to be gone."""
        with contextlib.suppress(redis.RedisError):
            redis.Redis.from_url(self.url).shutdown(nosave=True)
        if self.service is not None and not self.service.wait(10):
            raise ScenarioError("redis-server did not shut down")


class PostgresCluster:
    """A private PostgreSQL cluster: its own data dir, port and socket dir, run as the postgres user if root."""

    def __init__(self, supervisor: Supervisor, directory: Path) -> None:
        self.pg_ctl, initdb = shutil.which("pg_ctl"), shutil.which("initdb")
        if self.pg_ctl is None or initdb is None:
            raise SkipScenario("no PostgreSQL binaries")
        self.initdb = initdb
        self.supervisor = supervisor
        self.directory = directory
        self.data = directory / "data"
        self.port = free_port()
        self.log = supervisor.log("postgres")
        self.user = _postgres_os_user()

    def url(self, database: str) -> str:
        return f"postgres://postgres@127.0.0.1:{self.port}/{database}"

    def create(self, database: str) -> None:
        """initdb, start, and CREATE DATABASE; the cluster stops when the supervisor exits."""
        self.directory.mkdir(parents=True)
        if self.user is not None:
            shutil.chown(self.directory, self.user.pw_uid, self.user.pw_gid)
        self._run([self.initdb, "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"])
        self.supervisor.callback(self.stop, "immediate")
        self.start()
        with psycopg.connect(self.url("postgres"), autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{database}"')

    def start(self) -> None:
        options = f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run([str(self.pg_ctl), "-D", str(self.data), "-w", "-t", "60", "-o", options, "start"])
        postmaster = int((self.data / "postmaster.pid").read_text().split()[0])
        self.supervisor.record(postmaster, "postgres")  # pg_ctl starts it in a session of its own

    def stop(self, mode: str = "fast") -> None:
        if (self.data / "postmaster.pid").exists():
            self._run([str(self.pg_ctl), "-D", str(self.data), "-w", "-t", "60", "-m", mode, "stop"])

    def _run(self, argv: list[str]) -> None:
        if self.user is not None:
            argv = ["runuser", "-u", self.user.pw_name, "--", *argv]
        # The server inherits this output (no -l): the log stays writable whoever owns the data dir.
        result = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT, check=False)
        if result.returncode != 0:
            raise ScenarioError(f"{shlex.join(argv)} exited with {result.returncode}; see postgres.log")


def _postgres_os_user() -> pwd.struct_passwd | None:
    """The OS user to run PostgreSQL as: ``postgres`` when we are root (initdb refuses root), else ourselves."""
    if os.geteuid() != 0:
        return None
    if shutil.which("runuser") is None:
        raise SkipScenario("running as root without runuser to start PostgreSQL as another user")
    try:
        return pwd.getpwnam("postgres")
    except KeyError:
        raise SkipScenario("running as root and there is no postgres OS user to run PostgreSQL as") from None


def parent_pid(pid: int) -> int | None:
    stat = _stat(pid)
    return int(stat[1]) if stat else None


def group_members(pgid: int) -> list[int]:
    """The live processes of a process group (zombies, which only wait to be reaped, left out)."""
    members = []
    for entry in Path("/proc").iterdir():
        stat = _stat(int(entry.name)) if entry.name.isdigit() else None
        if stat and stat[2] == str(pgid) and stat[0] != "Z":
            members.append(int(entry.name))
    return members


def _group_ends(pgid: int, timeout: float) -> bool:
    return wait_until(lambda: not group_members(pgid), timeout)


def _stat(pid: int) -> list[str] | None:
    """Fields 3 on (state, ppid, pgrp, ...) of /proc/PID/stat, or None when the process is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces.
    return stat.rsplit(")", 1)[1].split()
