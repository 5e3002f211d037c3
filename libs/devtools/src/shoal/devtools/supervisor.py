"""Run Shoal services as supervised OS processes: the core of ``shoal up`` and of the
cross-service tests' ``fleet`` fixture.

A :class:`ServiceProcess` is one ``shoal run <service>`` child in a session of its own (so a
terminal's Ctrl-C reaches only the supervisor, which stops children in order). Its output is
either echoed line by line with a ``name | `` prefix or appended to ``<log_dir>/<name>.log``.
On Linux each child gets a parent-death signal, and :class:`Watchdog` (a separate process
holding a pipe from the supervisor) stops whatever is left if the supervisor is SIGKILLed.

Example::

    config = FleetConfig(nats_url=nats_url, database_url=database_url, admin_key="shoal_dev_x")
    async with Fleet(fleet_specs(config), config=config, log_dir=tmp / "logs") as fleet:
        await fleet.wait_ready(within=60)
        fleet["session"].kill()              # SIGKILL; autorestart=False leaves it down
        await fleet["session"].start()
        print(fleet.gateway_url, fleet.admin_key)

Fork from one long-lived thread (the one running the event loop): Linux delivers the
parent-death signal when the *thread* that forked a child exits, not the process.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING, Protocol

from shoal.common.errors import Conflict, NotFound, Unavailable

if TYPE_CHECKING:
    import httpx

__all__ = [
    "SERVICES",
    "Fleet",
    "FleetConfig",
    "ServiceProcess",
    "ServiceSpec",
    "Watchdog",
    "fleet_specs",
    "pid_alive",
]

log = logging.getLogger("shoal.supervisor")

SERVICES: tuple[str, ...] = ("keys", "eventbus", "session", "scheduler", "gateway")

_BACKOFF_MIN = 0.5  # seconds before the first restart; doubles per crash up to _BACKOFF_MAX
_BACKOFF_MAX = 30.0
_STABLE_AFTER = 30.0  # a child that ran this long (s) crashed "fresh": backoff starts over
_LINE_LIMIT = 1 << 20  # longest output line read whole (bytes); longer ones are split
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>

Echo = Callable[[bytes], None]
Notify = Callable[[str], None]


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` is a running process (a zombie awaiting its reaper counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:
        return True
    # The command name in parentheses may contain spaces; the state follows the last ")".
    return stat.rsplit(")", 1)[-1].split()[0] not in ("Z", "X")


def _signal_pid(pid: int, sig: int, *, group: bool) -> None:
    """Send ``sig`` to ``pid`` (or its process group, which our children lead); ignore the gone."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if group:
            try:
                os.killpg(pid, sig)
                return
            except ProcessLookupError:
                pass
        os.kill(pid, sig)


def _die_with_parent(sig: int) -> Callable[[], None] | None:
    """A ``preexec_fn`` asking Linux to send ``sig`` to the child when its parent dies."""
    if not sys.platform.startswith("linux"):
        return None
    # Resolve prctl before fork: the child only makes the call.
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the request took effect
            os._exit(1)

    return preexec


def _stdout_echo(data: bytes) -> None:
    with contextlib.suppress(BrokenPipeError, ValueError):
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()


@dataclass(frozen=True)
class ServiceSpec:
    """How to start one service process: its name in the fleet, command, environment and port."""

    name: str
    argv: tuple[str, ...]
    env: Mapping[str, str]
    http_port: int
    http_host: str = "127.0.0.1"
    # The port was free when it was picked, not reserved: another process may bind it before
    # the child does. Such a port is picked again when the child (re)starts and finds it taken.
    port_picked: bool = False

    @property
    def url(self) -> str:
        """Where to reach its HTTP server from this machine."""
        host = "127.0.0.1" if self.http_host in ("", "0.0.0.0", "::") else self.http_host
        return f"http://{host}:{self.http_port}"


@dataclass(frozen=True)
class FleetConfig:
    """The five services wired to one NATS and one PostgreSQL (see :func:`fleet_specs`)."""

    nats_url: str
    database_url: str
    admin_key: str
    gateway_port: int = 0  # 0: a free port chosen when the specs are built
    gateway_host: str = "127.0.0.1"
    session_replicas: int = 1
    scheduler_replicas: int = 1  # replicas share the timers table; SKIP LOCKED claims each once
    subject_prefix: str | None = None
    object_store_path: Path | None = None  # sets SHOAL_OBJECT_STORE=fs and its path
    extra_env: Mapping[str, str] = field(default_factory=dict)
    base_env: Mapping[str, str] | None = None  # None: this process's environment
    python: str = sys.executable
    services: tuple[str, ...] = SERVICES


def replica_names(service: str, replicas: int) -> list[str]:
    """Fleet names of a service's replicas: ``session`` alone, or ``session-0``, ``session-1``..."""
    if replicas == 1:
        return [service]
    return [f"{service}-{i}" for i in range(replicas)]


def fleet_specs(config: FleetConfig) -> list[ServiceSpec]:
    """One spec per process: each service once, the session ``session_replicas`` times and the
    scheduler ``scheduler_replicas`` times.

    Internal services listen on free ports of 127.0.0.1 (only for /healthz and /readyz);
    the gateway on ``gateway_host:gateway_port``.
    """
    from shoal.devtools.embedded import free_port

    replica_counts = {
        "session": config.session_replicas,
        "scheduler": config.scheduler_replicas,
    }
    for service, count in replica_counts.items():
        if count < 1:
            raise ValueError(f"{service}_replicas must be at least 1")
    base = dict(os.environ if config.base_env is None else config.base_env)
    base.update(
        {
            "SHOAL_ENVIRONMENT": "development",
            "SHOAL_NATS_URL": config.nats_url,
            "SHOAL_DATABASE_URL": config.database_url,
            "SHOAL_DEV_ADMIN_KEY": config.admin_key,
            "PYTHONUNBUFFERED": "1",  # a log line reaches the supervisor when it is written
        }
    )
    if config.subject_prefix is not None:
        base["SHOAL_SUBJECT_PREFIX"] = config.subject_prefix
    if config.object_store_path is not None:
        base["SHOAL_OBJECT_STORE"] = "fs"
        base["SHOAL_OBJECT_STORE_PATH"] = str(config.object_store_path)
    for inherited in ("SHOAL_REPLICA_INDEX", "SHOAL_REPLICA_COUNT"):
        base.pop(inherited, None)

    specs = []
    for service in config.services:
        replicas = replica_counts.get(service, 1)
        for index, name in enumerate(replica_names(service, replicas)):
            gateway = service == "gateway"
            host = config.gateway_host if gateway else "127.0.0.1"
            picked = not (gateway and config.gateway_port)
            port = free_port() if picked else config.gateway_port
            env = {
                **base,
                "SHOAL_SERVICE_NAME": service,
                "SHOAL_INSTANCE_ID": f"session-{index}" if service == "session" else name,
                "SHOAL_HTTP_HOST": host,
                "SHOAL_HTTP_PORT": str(port),
            }
            if service == "session":
                env["SHOAL_REPLICA_INDEX"] = str(index)
                env["SHOAL_REPLICA_COUNT"] = str(replicas)
            env.update(config.extra_env)
            argv = (config.python, "-m", "shoal.common.cli", "run", service)
            specs.append(
                ServiceSpec(
                    name=name,
                    argv=argv,
                    env=env,
                    http_port=port,
                    http_host=host,
                    port_picked=picked,
                )
            )
    return specs


class ServiceProcess:
    """One supervised service process; ``start`` again after ``stop`` or ``kill`` for a new one.

    With ``autorestart`` a child that exits on its own is started again after a backoff
    (0.5 s doubling to 30 s); ``stop`` turns that off until the next ``start``.
    """

    def __init__(
        self,
        spec: ServiceSpec,
        *,
        log_dir: Path | None = None,
        autorestart: bool = False,
        death_signal: int = signal.SIGTERM,
        echo: Echo = _stdout_echo,
        notify: Notify = log.info,
        on_spawn: Callable[[ServiceProcess], None] | None = None,
        on_exit: Callable[[ServiceProcess, int, int], None] | None = None,
    ) -> None:
        self.spec = spec
        self.log_dir = log_dir
        self.autorestart = autorestart
        self.death_signal = death_signal
        self.restarts = 0
        self.last_probe = "not probed"
        self._echo = echo
        self._notify = notify
        self._on_spawn = on_spawn
        self._on_exit = on_exit
        self._proc: asyncio.subprocess.Process | None = None
        self._pump: asyncio.Task[None] | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._stopping = False
        self._started_at = 0.0

    def __repr__(self) -> str:
        return f"<ServiceProcess {self.name} pid={self.pid} returncode={self.returncode}>"

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def url(self) -> str:
        return self.spec.url

    @property
    def pid(self) -> int | None:
        """The current child's pid (the last one's after it exited; None before the first)."""
        return self._proc.pid if self._proc is not None else None

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    @property
    def log_path(self) -> Path | None:
        return self.log_dir / f"{self.name}.log" if self.log_dir is not None else None

    async def start(self) -> None:
        """Start the child (and, with ``autorestart``, its supervision)."""
        if self.running:
            raise Conflict(f"{self.name} is already running (pid {self.pid})")
        self._stopping = False
        await self._finish_output()
        await self._spawn()
        if self.autorestart:
            self._supervisor = asyncio.create_task(self._supervise(), name=f"supervise {self.name}")

    async def stop(self, grace: float = 10.0) -> int | None:
        """SIGTERM, wait up to ``grace`` seconds, then SIGKILL the process group."""
        self._stopping = True
        await self._cancel_supervisor()
        proc = self._proc
        if proc is None:
            return None
        if proc.returncode is None:
            self.send_signal(signal.SIGTERM)
            self.send_signal(signal.SIGCONT)  # a paused child only acts on SIGTERM once resumed
            try:
                await asyncio.wait_for(proc.wait(), grace)
            except TimeoutError:
                self._notify(f"{self.name} did not stop within {grace:.0f}s; killing it")
                self.send_signal(signal.SIGKILL)
                await proc.wait()
        await self._finish_output()
        return proc.returncode

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` (SIGKILL by default) to the child's process group; do not wait."""
        self.send_signal(sig)

    def pause(self) -> None:
        """SIGSTOP: the process stays, stops answering (a hung service)."""
        self.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.send_signal(signal.SIGCONT)

    def send_signal(self, sig: int) -> None:
        """SIGTERM/SIGINT go to the child itself (it shuts down its own); others to its group."""
        if self._proc is None or self._proc.returncode is not None:
            return
        _signal_pid(self._proc.pid, sig, group=sig not in (signal.SIGTERM, signal.SIGINT))

    async def wait(self) -> int:
        """Wait for the current child to exit; its return code (negative: killed by a signal)."""
        if self._proc is None:
            raise NotFound(f"{self.name} was never started")
        return await self._proc.wait()

    async def probe(self, client: httpx.AsyncClient) -> bool:
        """Whether ``/readyz`` answers 200 now; ``last_probe`` says what it answered."""
        if not self.running:
            self.last_probe = f"exited with code {self.returncode}"
            return False
        try:
            response = await client.get(f"{self.url}/readyz")
            answered_by = response.json().get("pid") if response.status_code == 200 else None
        except Exception as exc:  # refused, reset, timed out, not ours: all mean "not yet"
            self.last_probe = f"no answer ({type(exc).__name__})"
            return False
        self.last_probe = f"{response.status_code} {response.text[:200]}"
        if response.status_code == 200 and answered_by != self.pid:
            # Another process holds the port (the child could not bind it and is exiting):
            # its answer says nothing about the child.
            self.last_probe = f"answered by pid {answered_by} on {self.url}, not {self.pid}"
            return False
        return response.status_code == 200

    def log_tail(self, lines: int = 20) -> str:
        """The end of the log file (empty when output is echoed instead)."""
        path = self.log_path
        if path is None or not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def _open_log(self) -> IO[bytes] | None:
        path = self.log_path
        if path is None:
            return None
        path.parent.mkdir(parents=True, exist_ok=True)
        return path.open("ab")

    async def _spawn(self) -> None:
        self._repick_port_if_taken()
        log_file = self._open_log()
        try:
            self._proc = await asyncio.create_subprocess_exec(
                *self.spec.argv,
                env=dict(self.spec.env),
                stdin=subprocess.DEVNULL,
                stdout=log_file if log_file is not None else subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C in a terminal reaches the supervisor only
                preexec_fn=_die_with_parent(self.death_signal),
                limit=_LINE_LIMIT,
            )
        finally:
            if log_file is not None:
                log_file.close()
        self._started_at = time.monotonic()
        if self._proc.stdout is not None:
            self._pump = asyncio.create_task(self._echo_lines(self._proc.stdout))
        if self._on_spawn is not None:
            self._on_spawn(self)

    def _repick_port_if_taken(self) -> None:
        from shoal.devtools.embedded import free_port, port_in_use

        spec = self.spec
        if not spec.port_picked or not port_in_use(spec.http_port):
            return
        port = free_port()
        self._notify(f"{self.name}: port {spec.http_port} is taken by another process; now {port}")
        env = {**spec.env, "SHOAL_HTTP_PORT": str(port)}
        self.spec = dataclasses.replace(spec, http_port=port, env=env)

    async def _echo_lines(self, stream: asyncio.StreamReader) -> None:
        prefix = f"{self.name} | ".encode()
        while True:
            try:
                line = await stream.readuntil(b"\n")
            except asyncio.IncompleteReadError as eof:
                if eof.partial:
                    self._echo(prefix + eof.partial + b"\n")
                return
            except asyncio.LimitOverrunError as long:
                line = await stream.read(long.consumed) + b"\n"
            self._echo(prefix + line)

    async def _finish_output(self) -> None:
        """Let the echo task print the last lines (a grandchild may hold the pipe: 2 s at most)."""
        pump, self._pump = self._pump, None
        if pump is None:
            return
        try:
            await asyncio.wait_for(pump, 2.0)
        except TimeoutError:
            pass

    async def _cancel_supervisor(self) -> None:
        task, self._supervisor = self._supervisor, None
        if task is None or task is asyncio.current_task():
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def _supervise(self) -> None:
        backoff = _BACKOFF_MIN
        while True:
            proc = self._proc
            assert proc is not None
            code = await proc.wait()
            await self._finish_output()
            if self._stopping:
                return
            if self._on_exit is not None:
                self._on_exit(self, proc.pid, code)
            if time.monotonic() - self._started_at >= _STABLE_AFTER:
                backoff = _BACKOFF_MIN
            self._notify(f"{self.name} exited with code {code}; restarting in {backoff:.1f}s")
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, _BACKOFF_MAX)
            self.restarts += 1
            await self._spawn()


class Fleet:
    """Several :class:`ServiceProcess` es started, probed and stopped together."""

    def __init__(
        self,
        specs: Sequence[ServiceSpec],
        *,
        config: FleetConfig | None = None,
        log_dir: Path | None = None,
        autorestart: bool = False,
        death_signal: int = signal.SIGTERM,
        echo: Echo = _stdout_echo,
        notify: Notify = log.info,
        on_spawn: Callable[[ServiceProcess], None] | None = None,
        on_exit: Callable[[ServiceProcess, int, int], None] | None = None,
    ) -> None:
        names = [spec.name for spec in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate service names in {names}")
        self.config = config
        self._processes = {
            spec.name: ServiceProcess(
                spec,
                log_dir=log_dir,
                autorestart=autorestart,
                death_signal=death_signal,
                echo=echo,
                notify=notify,
                on_spawn=on_spawn,
                on_exit=on_exit,
            )
            for spec in specs
        }

    def __getitem__(self, name: str) -> ServiceProcess:
        try:
            return self._processes[name]
        except KeyError:
            raise NotFound(f"no service {name!r} in this fleet ({', '.join(self)})") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._processes)

    @property
    def processes(self) -> list[ServiceProcess]:
        return list(self._processes.values())

    @property
    def gateway_url(self) -> str:
        return self["gateway"].url

    @property
    def admin_key(self) -> str:
        if self.config is None:
            raise NotFound("this fleet was not built from a FleetConfig")
        return self.config.admin_key

    def pids(self) -> dict[str, int | None]:
        return {name: proc.pid for name, proc in self._processes.items()}

    async def start(self) -> None:
        for proc in self._processes.values():
            await proc.start()

    async def wait_ready(self, within: float = 60.0, *, interval: float = 0.1) -> None:
        """Wait until every ``/readyz`` answers 200.

        Raises Unavailable naming the laggards (with their log tails) after ``within`` seconds,
        or at once when a child without ``autorestart`` exits.
        """
        import httpx

        deadline = time.monotonic() + within
        pending = dict(self._processes)
        async with httpx.AsyncClient(timeout=2.0, trust_env=False) as client:
            while True:
                for proc in pending.values():
                    if not proc.running and not proc.autorestart:
                        raise Unavailable(
                            f"{proc.name} exited with code {proc.returncode} before it was ready"
                            + _tail_suffix(proc)
                        )
                results = await asyncio.gather(*(p.probe(client) for p in pending.values()))
                for proc, ready in zip(list(pending.values()), results, strict=True):
                    if ready:
                        del pending[proc.name]
                if not pending:
                    return
                if time.monotonic() >= deadline:
                    lagging = "; ".join(f"{p.name}: {p.last_probe}" for p in pending.values())
                    tails = "".join(_tail_suffix(p) for p in pending.values())
                    raise Unavailable(f"not ready after {within:.0f}s ({lagging}){tails}")
                await asyncio.sleep(interval)

    async def stop(self, grace: float = 10.0) -> None:
        """Stop every process at once (SIGTERM, ``grace`` seconds, SIGKILL)."""
        await asyncio.gather(*(proc.stop(grace) for proc in self._processes.values()))

    def kill_all(self, sig: int = signal.SIGKILL) -> None:
        for proc in self._processes.values():
            proc.kill(sig)

    async def __aenter__(self) -> Fleet:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()


def _tail_suffix(proc: ServiceProcess) -> str:
    tail = proc.log_tail()
    return f"\n--- {proc.log_path} (last lines) ---\n{tail}" if tail else ""


class Watchdog:
    """A separate process that stops what the supervisor started if the supervisor dies.

    The supervisor holds the write end of the watchdog's stdin. A clean stop says ``done``;
    end of file without it means the supervisor was killed, and the watchdog stops each
    watched pid by stage: the polite signal, up to ``grace`` seconds, then SIGKILL to its
    process group. ``keep_fds`` stay open in the watchdog until it is done (e.g. a lock).
    """

    def __init__(self, *, keep_fds: Sequence[int] = (), log_file: Path | None = None) -> None:
        self._keep_fds = tuple(keep_fds)
        self._log_file = log_file
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        out = self._log_file.open("ab") if self._log_file is not None else subprocess.DEVNULL
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "shoal.devtools.supervisor"],
                stdin=subprocess.PIPE,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # not in the terminal's process group: Ctrl-C spares it
                pass_fds=self._keep_fds,
            )
        finally:
            if not isinstance(out, int):
                out.close()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def watch(self, pid: int, *, stage: int, sig: int, grace: float) -> None:
        """Stop ``pid`` in ``stage`` (lower first) with ``sig``, SIGKILL after ``grace`` s."""
        self._send(f"watch {pid} {stage} {int(sig)} {grace}")

    def forget(self, pid: int) -> None:
        self._send(f"forget {pid}")

    def close(self, timeout: float = 5.0) -> None:
        """Clean stop: tell the watchdog nothing needs stopping, and wait for it."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        with contextlib.suppress(BrokenPipeError, OSError, ValueError):
            assert proc.stdin is not None
            proc.stdin.write(b"done\n")
            proc.stdin.close()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def _send(self, line: str) -> None:
        if self._proc is None or self._proc.stdin is None:
            return
        try:
            self._proc.stdin.write(line.encode() + b"\n")
            self._proc.stdin.flush()
        except (BrokenPipeError, OSError):
            log.warning("the watchdog is gone; children may outlive a killed supervisor")


def _watchdog_main() -> None:
    """The watchdog process: read ``watch``/``forget``/``done`` lines until end of file."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    watched: dict[int, tuple[int, int, float]] = {}
    for raw in sys.stdin.buffer:
        words = raw.decode().split()
        if not words:
            continue
        if words[0] == "done":
            return
        if words[0] == "watch":
            watched[int(words[1])] = (int(words[2]), int(words[3]), float(words[4]))
        elif words[0] == "forget":
            watched.pop(int(words[1]), None)
    # End of file without "done": the supervisor died without stopping its children.
    for stage in sorted({stage for stage, _, _ in watched.values()}):
        members = {pid: (sig, grace) for pid, (s, sig, grace) in watched.items() if s == stage}
        for pid, (sig, _) in members.items():
            print(f"watchdog: supervisor gone; sending signal {sig} to {pid}", flush=True)
            _signal_pid(pid, sig, group=False)
        deadline = time.monotonic() + max(grace for _, grace in members.values())
        while time.monotonic() < deadline and any(pid_alive(pid) for pid in members):
            time.sleep(0.1)
        for pid in members:
            if pid_alive(pid):
                print(f"watchdog: killing {pid}", flush=True)
                _signal_pid(pid, signal.SIGKILL, group=True)


if __name__ == "__main__":
    _watchdog_main()


class FleetFactory(Protocol):
    """The ``fleet`` test fixture: starts the services as OS processes (tests/conftest.py)."""

    def __call__(
        self,
        *,
        subject_prefix: str | None = None,
        session_replicas: int = 1,
        scheduler_replicas: int = 1,
        env: Mapping[str, str] | None = None,
        nats_url: str = ...,
        database_url: str = ...,
        ready_within: float = 60.0,
    ) -> Awaitable[Fleet]: ...
