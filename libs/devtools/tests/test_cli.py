"""The ``shoal`` command and the supervision core behind ``shoal up`` and the ``fleet`` fixture.

Most tests run stand-in services: a distribution on ``PYTHONPATH`` that declares the five
``shoal.services`` entry points with a minimal ``create_app`` (the first one on ``sys.path``
wins, so they shadow the installed services in the child processes only). The e2e test at the
end runs the real services once their ``create_app`` exists.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import nats
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from shoal.common.cli import main
from shoal.common.errors import Unavailable
from shoal.devtools.embedded import free_port, port_in_use
from shoal.devtools.supervisor import (
    SERVICES,
    Fleet,
    FleetConfig,
    ServiceSpec,
    fleet_specs,
    pid_alive,
)

STUB_APP = """
import logging
import os
from contextlib import asynccontextmanager

from shoal.common.service import Readiness, create_service_app
from shoal.common.settings import CommonSettings


def create_app(settings=None):
    settings = settings or CommonSettings()
    readiness = Readiness()
    readiness.add("stub", lambda: True)

    @asynccontextmanager
    async def lifespan(app):
        logging.getLogger("stub").info(
            "stub up",
            extra={
                "instance": settings.replica_name,
                "replica": os.environ.get("SHOAL_REPLICA_INDEX", ""),
            },
        )
        yield

    return create_service_app(settings.service_name, settings, lifespan, readiness)
"""


def _services_written() -> bool:
    for name in SERVICES:
        try:
            if importlib.util.find_spec(f"shoal.{name}.app") is None:
                return False
        except ModuleNotFoundError:
            return False
    return True


real_services = pytest.mark.skipif(
    not _services_written(), reason="services/*/src/shoal/*/app.py (create_app) not written yet"
)


@pytest.fixture(scope="module")
def stub_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("stub-services")
    dist = root / "shoal_stub_services-0.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: shoal-stub-services\nVersion: 0.0\n"
    )
    lines = [f"{name} = shoal_stub_app:create_app" for name in SERVICES]
    (dist / "entry_points.txt").write_text("[shoal.services]\n" + "\n".join(lines) + "\n")
    (root / "shoal_stub_app.py").write_text(STUB_APP)
    return root


def _child_env(stub_path: Path | None) -> dict[str, str]:
    """This environment without SHOAL_* settings (and with the stubs first on the path)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHOAL_")}
    if stub_path is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(stub_path), env.get("PYTHONPATH")]))
    return env


def _processes_mentioning(text: str) -> list[int]:
    """Live processes whose arguments or environment contain ``text``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            # nats-server and postgres name the home in their arguments, services in their
            # environment (SHOAL_OBJECT_STORE_PATH).
            seen = (entry / "cmdline").read_bytes() + (entry / "environ").read_bytes()
            if text in seen.decode(errors="replace") and pid_alive(int(entry.name)):
                found.append(int(entry.name))
    return found


# --- shoal run -------------------------------------------------------------------------------


def test_run_unknown_service_exits_2_naming_the_known_ones() -> None:
    script = Path(sys.executable).parent / "shoal"
    result = subprocess.run(
        [str(script), "run", "nosuch"], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2
    assert "unknown service 'nosuch'" in result.stderr
    assert "gateway" in result.stderr


def test_cli_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (
        [],
        ["up", "--nats-port", "70000"],
        ["up", "--session-replicas", "0"],
        ["up", "--scheduler-replicas", "0"],
    ):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2
    assert "port out of range" in capsys.readouterr().err


def test_run_serves_the_app_and_stops_cleanly_on_sigterm(stub_path: Path, tmp_path: Path) -> None:
    port = free_port()
    env = _child_env(stub_path) | {"SHOAL_HTTP_PORT": str(port), "SHOAL_SHUTDOWN_GRACE": "PT2S"}
    with (tmp_path / "out.log").open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "shoal.common.cli", "run", "keys"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and proc.poll() is None:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                    break
            time.sleep(0.1)
        response = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1)
        assert response.json() == {"status": "ok", "service": "keys"}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    logs = [json.loads(line) for line in (tmp_path / "out.log").read_text().splitlines()]
    assert any(entry.get("message") == "stub up" for entry in logs), "JSON logging expected"


# --- shoal up: refusals ----------------------------------------------------------------------


@pytest.mark.parametrize("flag", ["--nats-port", "--postgres-port", "--gateway-port"])
def test_up_refuses_a_taken_port_and_starts_nothing(
    flag: str, stub_path: Path, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    ports = {"--nats-port": "0", "--postgres-port": "0", "--gateway-port": "0"}
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        ports[flag] = str(port)
        argv = [sys.executable, "-m", "shoal.common.cli", "up", "--home", str(home)]
        argv += ["--nats-monitor-port", "0", *(x for kv in ports.items() for x in kv)]
        result = subprocess.run(
            argv, env=_child_env(stub_path), capture_output=True, text=True, timeout=60
        )
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"port {port} ({flag}) is already in use" in result.stderr
    assert _processes_mentioning(str(home)) == []
    assert not (home / "up.json").exists()


def test_up_refuses_a_home_in_use(stub_path: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    fd = os.open(home / "up.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, b"4242\n")
        result = subprocess.run(
            [sys.executable, "-m", "shoal.common.cli", "up", "--home", str(home)],
            env=_child_env(stub_path),
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        os.close(fd)
    assert result.returncode == 1
    assert "in use by another `shoal up` (pid 4242)" in result.stderr


def test_up_gives_up_when_not_ready_in_time(stub_path: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    argv = [sys.executable, "-m", "shoal.common.cli", "up", "--home", str(home)]
    argv += ["--nats-port", "0", "--nats-monitor-port", "0", "--postgres-port", "0"]
    argv += ["--gateway-port", "0", "--ready-timeout", "0.01"]
    result = subprocess.run(
        argv, env=_child_env(stub_path), capture_output=True, text=True, timeout=90
    )
    assert result.returncode == 1
    assert "shoal up: not ready after 0s (keys: " in result.stderr
    assert _processes_mentioning(str(home)) == []


# --- shoal up: the whole fleet ---------------------------------------------------------------


class _Up:
    """A ``shoal up`` child for a test; ``close`` makes sure nothing it started survives."""

    def __init__(self, home: Path, env: dict[str, str], *extra: str) -> None:
        self.home = home
        self.output = home.parent / f"up-{time.monotonic_ns()}.out"
        self.nats_port = free_port()
        self.postgres_port = free_port()
        argv = [sys.executable, "-m", "shoal.common.cli", "up", "--home", str(home)]
        argv += ["--nats-port", str(self.nats_port), "--nats-monitor-port", "0"]
        argv += ["--postgres-port", str(self.postgres_port), "--gateway-port", "0", *extra]
        with self.output.open("wb") as out:
            self.proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)
        self.state: dict[str, Any] = {}

    def log(self) -> str:
        return self.output.read_text(errors="replace")

    def all_pids(self) -> list[int]:
        named = self.state.get("services", []) + self.state.get("servers", [])
        return [int(entry["pid"]) for entry in named]

    def wait_up(self, within: float = 90.0) -> dict[str, Any]:
        state_path = self.home / "up.json"
        deadline = time.monotonic() + within
        while not state_path.exists() or self.state.get("pid") != self.proc.pid:
            if self.proc.poll() is not None:
                pytest.fail(f"shoal up exited with {self.proc.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                pytest.fail(f"no up.json after {within:.0f}s:\n{self.log()}")
            time.sleep(0.1)
            with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
                self.state = json.loads(state_path.read_text())
        return self.state

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for pid in self.all_pids():
            with contextlib.suppress(ProcessLookupError):
                if pid_alive(pid):
                    os.kill(pid, signal.SIGKILL)


@pytest.fixture
def start_up() -> Iterator[Any]:
    started: list[_Up] = []

    def start(home: Path, env: dict[str, str], *extra: str) -> _Up:
        started.append(_Up(home, env, *extra))
        return started[-1]

    yield start
    for up in started:
        up.close()


def _wait_gone(pids: list[int], within: float) -> list[int]:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline and any(pid_alive(pid) for pid in pids):
        time.sleep(0.1)
    return [pid for pid in pids if pid_alive(pid)]


async def _touch_marker(database_url: str, create: bool) -> bool:
    """Create (or look for) a table in the fleet's database: data kept across runs."""
    engine = create_async_engine(database_url)
    try:
        async with engine.begin() as conn:
            if create:
                await conn.execute(text("CREATE TABLE shoal_up_marker (id int)"))
            found = await conn.scalar(text("SELECT to_regclass('shoal_up_marker') IS NOT NULL"))
        return bool(found)
    finally:
        await engine.dispose()


def _run(coro: Any) -> Any:
    """Run ``coro`` on a loop of its own (leaving pytest-asyncio's loop alone)."""
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.close()


def _round_trip(start_up: Any, home: Path, env: dict[str, str], services: list[str]) -> None:
    """``shoal up`` until ready, check it, SIGINT; then again on the same home."""
    first = start_up(home, env)
    state = first.wait_up()
    assert set(state) >= {"gateway_url", "admin_key", "nats_url", "database_url", "services"}
    assert [entry["name"] for entry in state["services"]] == services
    assert state["admin_key"].startswith("shoal_dev_")
    assert state["nats_url"] == f"nats://127.0.0.1:{first.nats_port}"
    assert f"@127.0.0.1:{first.postgres_port}/shoal" in state["database_url"]
    assert oct((home / "up.json").stat().st_mode & 0o777) == "0o600"
    assert oct((home / "admin_key").stat().st_mode & 0o777) == "0o600"
    assert all(pid_alive(pid) for pid in first.all_pids())
    assert set(first.all_pids()) <= set(_processes_mentioning(str(home)))
    response = httpx.get(f"{state['gateway_url']}/healthz", timeout=5)
    assert response.status_code == 200
    assert state["admin_key"] in first.log()
    assert _run(_touch_marker(state["database_url"], create=True))
    pids = first.all_pids()

    first.proc.send_signal(signal.SIGINT)
    assert first.proc.wait(90) == 0, first.log()
    assert _wait_gone(pids, 10) == []
    assert _processes_mentioning(str(home)) == []
    assert not (home / "up.json").exists()

    second = start_up(home, env)
    again = second.wait_up()
    assert again["admin_key"] == state["admin_key"]
    assert _run(_touch_marker(again["database_url"], create=False))
    second.proc.send_signal(signal.SIGINT)
    assert second.proc.wait(90) == 0, second.log()
    assert _wait_gone(second.all_pids(), 10) == []


def test_up_runs_the_fleet_and_stops_it_on_sigint(
    start_up: Any, stub_path: Path, tmp_path: Path
) -> None:
    services = ["keys", "eventbus", "session-0", "session-1", "scheduler-0", "scheduler-1"]
    services.append("gateway")
    env = _child_env(stub_path)
    home = tmp_path / "home"
    first = start_up(home, env, "--session-replicas", "2", "--scheduler-replicas", "2")
    state = first.wait_up()
    assert [entry["name"] for entry in state["services"]] == services
    log = first.log()
    for name in services:
        assert f"\n{name} | {{" in log, f"no prefixed output from {name}"
    assert '"instance":"session-1","replica":"1"' in log
    assert '"instance":"scheduler-1"' in log
    first.close()
    assert first.proc.returncode == 0
    assert _wait_gone(first.all_pids(), 10) == []

    _round_trip(start_up, tmp_path / "home2", env, list(SERVICES))


def test_up_restarts_a_service_that_dies(start_up: Any, stub_path: Path, tmp_path: Path) -> None:
    up = start_up(tmp_path / "home", _child_env(stub_path))
    state = up.wait_up()
    old = next(entry["pid"] for entry in state["services"] if entry["name"] == "eventbus")
    os.kill(old, signal.SIGKILL)
    deadline = time.monotonic() + 30
    new = old
    while new == old and time.monotonic() < deadline:
        time.sleep(0.1)
        with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
            state = json.loads((tmp_path / "home" / "up.json").read_text())
            new = next(e["pid"] for e in state["services"] if e["name"] == "eventbus")
    assert new != old
    assert pid_alive(new)
    assert "eventbus exited with code -9; restarting" in up.log()


def test_a_killed_supervisor_leaves_nothing_running(
    start_up: Any, stub_path: Path, tmp_path: Path
) -> None:
    up = start_up(tmp_path / "home", _child_env(stub_path))
    up.wait_up()
    pids = up.all_pids()
    up.proc.kill()
    up.proc.wait()
    assert _wait_gone(pids, 30) == [], (tmp_path / "home" / "logs" / "watchdog.log").read_text()
    assert not port_in_use(up.postgres_port)
    assert not port_in_use(up.nats_port)


@pytest.mark.e2e
@pytest.mark.timeout(300)
@real_services
def test_up_with_the_real_services(start_up: Any, tmp_path: Path) -> None:
    _round_trip(start_up, tmp_path / "home", _child_env(None), list(SERVICES))


# --- Fleet -----------------------------------------------------------------------------------


def _stub_config(stub_path: Path, *services: str) -> FleetConfig:
    """A fleet of stand-in services that connect to nothing."""
    return FleetConfig(
        nats_url="nats://127.0.0.1:1",
        database_url="postgresql+asyncpg://postgres@127.0.0.1:1/none",
        admin_key="shoal_dev_test",
        services=services,
        base_env=_child_env(stub_path),
    )


@pytest.fixture
async def stub_fleet(stub_path: Path, tmp_path: Path) -> AsyncIterator[Fleet]:
    config = _stub_config(stub_path, "keys", "gateway")
    fleet = Fleet(fleet_specs(config), config=config, log_dir=tmp_path / "logs")
    try:
        await fleet.start()
        await fleet.wait_ready(30)
        yield fleet
    finally:
        await fleet.stop(grace=5)


async def test_fleet_kill_pause_resume_stop_start(stub_fleet: Fleet) -> None:
    keys = stub_fleet["keys"]
    assert stub_fleet.admin_key == "shoal_dev_test"
    async with httpx.AsyncClient(timeout=1) as client:
        assert (await client.get(f"{stub_fleet.gateway_url}/healthz")).status_code == 200

        keys.pause()
        with pytest.raises(httpx.ReadTimeout):
            await client.get(f"{keys.url}/healthz")
        keys.resume()
        assert (await client.get(f"{keys.url}/healthz")).status_code == 200

        first = keys.pid
        keys.kill()
        assert await keys.wait() == -signal.SIGKILL
        assert not keys.running  # no autorestart in tests
        await keys.start()
        assert keys.pid != first
        await stub_fleet.wait_ready(30)

        keys.pause()  # a paused process still stops: SIGTERM, then SIGCONT
        assert await keys.stop(grace=10) == 0
        assert keys.pid is not None
        assert not pid_alive(keys.pid)
    assert "stub up" in keys.log_tail()


async def test_fleet_restarts_and_prefixes_output(stub_path: Path) -> None:
    lines: list[bytes] = []
    notes: list[str] = []
    config = _stub_config(stub_path, "scheduler")
    spawned: list[int] = []
    fleet = Fleet(
        fleet_specs(config),
        autorestart=True,
        echo=lines.append,
        notify=notes.append,
        on_spawn=lambda proc: spawned.append(proc.pid or 0),
    )
    try:
        await fleet.start()
        await fleet.wait_ready(30)
        fleet["scheduler"].kill()
        for _ in range(300):
            if len(spawned) == 2:
                break
            await asyncio.sleep(0.1)
        assert len(spawned) == 2
        assert fleet["scheduler"].restarts == 1
        await fleet.wait_ready(30)
    finally:
        await fleet.stop(grace=5)
    assert all(line.startswith(b"scheduler | ") for line in lines)
    assert any(b'"message":"stub up"' in line for line in lines)
    assert notes == ["scheduler exited with code -9; restarting in 0.5s"]
    assert not pid_alive(spawned[-1])


async def test_wait_ready_reports_a_service_that_exits(tmp_path: Path) -> None:
    spec = ServiceSpec(
        name="broken",
        argv=(sys.executable, "-c", "print('no config, giving up'); raise SystemExit(3)"),
        env=dict(os.environ),
        http_port=free_port(),
    )
    fleet = Fleet([spec], log_dir=tmp_path)
    try:
        await fleet.start()
        with pytest.raises(Unavailable, match="broken exited with code 3") as error:
            await fleet.wait_ready(30)
        assert "no config, giving up" in error.value.message
    finally:
        await fleet.stop()


def test_free_port_never_hands_out_a_port_twice() -> None:
    # The OS gives a just-released port out again readily: 3 repeats in 200 picks here before.
    ports = [free_port() for _ in range(500)]
    assert len(set(ports)) == len(ports)


async def _impostor() -> asyncio.Server:
    """An HTTP server that answers every request as a ready service with another pid."""
    body = b'{"status":"ready","checks":{},"pid":1}'

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\n"
            + f"content-length: {len(body)}\r\n\r\n".encode()
            + body
        )
        await writer.drain()
        writer.close()

    return await asyncio.start_server(answer, "127.0.0.1", 0)


async def test_another_process_on_the_port_is_not_the_child_being_ready(tmp_path: Path) -> None:
    impostor = await _impostor()
    port = impostor.sockets[0].getsockname()[1]
    spec = ServiceSpec(
        name="slow",
        argv=(sys.executable, "-c", "import time; time.sleep(60)"),
        env=dict(os.environ),
        http_port=port,
    )
    fleet = Fleet([spec], log_dir=tmp_path)
    try:
        await fleet.start()
        async with httpx.AsyncClient(timeout=2) as client:
            assert not await fleet["slow"].probe(client)
        slow = fleet["slow"]
        assert slow.last_probe == f"answered by pid 1 on {spec.url}, not {slow.pid}"
    finally:
        await fleet.stop(grace=5)
        impostor.close()
        await impostor.wait_closed()


async def test_a_picked_port_found_taken_is_picked_again(stub_path: Path, tmp_path: Path) -> None:
    impostor = await _impostor()
    taken = impostor.sockets[0].getsockname()[1]
    config = _stub_config(stub_path, "keys")
    [picked] = fleet_specs(config)
    assert picked.port_picked
    # As if another process had bound the port between the pick and the child's start.
    spec = dataclasses.replace(
        picked, http_port=taken, env={**picked.env, "SHOAL_HTTP_PORT": str(taken)}
    )
    notes: list[str] = []
    fleet = Fleet([spec], log_dir=tmp_path, notify=notes.append)
    try:
        await fleet.start()
        await fleet.wait_ready(30)
        keys = fleet["keys"]
        assert keys.spec.http_port != taken
        now = keys.spec.http_port
        assert notes == [f"keys: port {taken} is taken by another process; now {now}"]
        async with httpx.AsyncClient(timeout=2) as client:
            assert (await client.get(f"{keys.url}/readyz")).json()["pid"] == keys.pid
    finally:
        await fleet.stop(grace=5)
        impostor.close()
        await impostor.wait_closed()


_ORPHAN_SCRIPT = """
import asyncio, sys
from shoal.devtools.supervisor import Fleet, FleetConfig, fleet_specs

async def main():
    config = FleetConfig(nats_url="nats://127.0.0.1:1", database_url="postgresql://x@127.0.0.1:1/x",
                         admin_key="k", services=("keys",))
    fleet = Fleet(fleet_specs(config), log_dir=__import__("pathlib").Path(sys.argv[1]))
    await fleet.start()
    await fleet.wait_ready(30)
    print(fleet["keys"].pid, flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


def test_services_die_with_their_supervisor(stub_path: Path, tmp_path: Path) -> None:
    """The parent-death signal alone (no watchdog): SIGKILL the supervisor, the child goes."""
    supervisor = subprocess.Popen(
        [sys.executable, "-c", _ORPHAN_SCRIPT, str(tmp_path)],
        env=_child_env(stub_path),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert supervisor.stdout is not None
        child = int(supervisor.stdout.readline())
        assert pid_alive(child)
        supervisor.kill()
        supervisor.wait()
        assert _wait_gone([child], 20) == []
    finally:
        if supervisor.poll() is None:
            supervisor.kill()
            supervisor.wait()


@pytest.mark.e2e
@pytest.mark.timeout(300)
@real_services
def test_up_with_a_nats_cluster_replicates_streams_and_buckets(
    start_up: Any, tmp_path: Path
) -> None:
    up = start_up(tmp_path / "home", _child_env(None), "--nats-cluster", "3")
    state = up.wait_up(150)
    servers = state["nats_url"].split(",")
    assert len(servers) == 3
    assert {entry["name"] for entry in state["servers"]} >= {"nats-n0", "nats-n1", "nats-n2"}

    async def replicas() -> dict[str, int]:
        from shoal.common.messaging import Subjects

        subjects = Subjects("shoal")
        nc = await nats.connect(servers)
        try:
            js = nc.jetstream()
            names = [
                subjects.session_cmd_stream,
                subjects.session_evt_stream,
                f"KV_{subjects.session_state_bucket}",
            ]
            return {name: (await js.stream_info(name)).config.num_replicas or 0 for name in names}
        finally:
            await nc.close()

    assert set(_run(replicas()).values()) == {3}
    pids = up.all_pids()
    up.proc.send_signal(signal.SIGINT)
    assert up.proc.wait(90) == 0, up.log()
    assert _wait_gone(pids, 10) == []
