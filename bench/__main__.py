"""``python -m bench [raw|command|all|fanout|jobs]``: run the benchmarks and print their tables.

See bench/README.md for what each figure means. Progress goes to stderr, tables to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
from pathlib import Path
from typing import Any

from bench._report import fmt, latency_cell, machine_info, run_loop, table
from bench.command_path import (
    CommandOptions,
    CommandResult,
    render_command_path,
    run_command_path,
)
from bench.gateway_fanout import FanoutOptions, FanoutResult, render_fanout, run_fanout
from bench.jobs import JobsOptions, render_jobs, run_jobs
from bench.peer import run_peer
from bench.raw_jetstream import RawOptions, RawResult, render_raw, run_raw

FSYNC_MODES = {"always": (True,), "default": (False,), "both": (True, False)}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description="Shoal benchmarks (figures only; nothing asserts)."
    )
    parser.add_argument(
        "which",
        nargs="?",
        choices=("all", "raw", "command", "fanout", "jobs"),
        default="all",
        help="raw: the JetStream baseline; command: Shoal's command path; all: both (default); "
        "fanout: event fan-out through one gateway next to a bare uvicorn broadcast server; "
        "jobs: jobs/s with workers and timer lateness, each next to a raw JetStream baseline",
    )
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run: 100 sessions, 3 s per measurement"
    )
    parser.add_argument("--sessions", type=int, help="sessions (and raw keys); default 1000")
    parser.add_argument("--concurrency", type=int, default=64, help="outstanding commands")
    parser.add_argument("--duration", type=float, help="measured seconds per run; default 10")
    parser.add_argument("--warmup", type=float, help="seconds of load before measuring; default 2")
    parser.add_argument(
        "--fsync", choices=tuple(FSYNC_MODES), default="both", help="nats-server sync_interval"
    )
    parser.add_argument(
        "--messages", type=int, help="messages for raw publish and pull + ack; default 100000"
    )
    parser.add_argument("--session-replicas", type=int, default=1, help="session processes")
    parser.add_argument(
        "--no-runner",
        action="store_true",
        help="command path only: no runner sockets, so a prompt is one command and one event",
    )
    parser.add_argument(
        "--fleet-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a setting for every service process (e.g. SHOAL_MAX_IN_FLIGHT=6400); repeatable",
    )
    parser.add_argument(
        "--keep-logs", action="store_true", help="keep the fleet's temporary directory and logs"
    )
    parser.add_argument(
        "--peer",
        choices=("restate",),
        help="command: also run ../shared/peers/<peer>/run_peer.sh (same keys and concurrency) "
        "and print it beside Shoal with the ratio",
    )
    parser.add_argument(
        "--json", type=Path, metavar="FILE", help="command: also write the figures to FILE"
    )
    fanout = parser.add_argument_group("fanout")
    fanout.add_argument("--open", type=int, help="client sockets receiving events; default 5000")
    fanout.add_argument("--idle", type=int, help="sockets receiving nothing; default 10000")
    fanout.add_argument(
        "--rate", type=float, help="events/s produced (--sessions: over how many); default 2000"
    )
    fanout.add_argument("--clients", type=int, default=4, help="load-generator processes")
    fanout.add_argument(
        "--idle-on",
        choices=("session", "user"),
        default="session",
        help="idle sockets: client sockets on idle sessions (10 each) or the user stream",
    )
    fanout.add_argument(
        "--stream-max-consumers",
        type=int,
        default=0,
        help="raise max_consumers of SESSION_EVT and DELIVER for the run (nats-server 2.15 "
        "defaults to 1,000 per stream; the gateway holds one consumer per socket)",
    )
    fanout.add_argument(
        "--server-core",
        action="store_true",
        help="the gateway (and the baseline server) on a core of its own, every other process "
        "of the run on the rest (what a Kubernetes CPU request gives it); needs >= 2 cores",
    )
    jobs = parser.add_argument_group("jobs")
    jobs.add_argument("--jobs", type=int, help="jobs submitted; default 2000")
    jobs.add_argument("--workers", type=int, default=10, help="SDK workers; default 10")
    jobs.add_argument("--timers", type=int, help="timers due at once; default 10000")
    fanout.add_argument("--no-baseline", action="store_true", help="skip the uvicorn baseline")
    fanout.add_argument("--no-shoal", action="store_true", help="only the uvicorn baseline")
    return parser


def _bounded(value: float, low: float, high: float, name: str) -> float:
    if not low <= value <= high:
        raise SystemExit(f"--{name} must be between {low:g} and {high:g}")
    return value


# The benches load the fleet with one key and one owner: the gateway's quotas would measure
# themselves. Off unless --fleet-env sets them.
_QUOTAS_OFF = (
    ("SHOAL_RATE_LIMIT_PER_KEY", "0"),
    ("SHOAL_MAX_SOCKETS_PER_OWNER", "0"),
    ("SHOAL_MAX_SESSIONS_PER_OWNER", "0"),
)


def _fleet_env(pairs: list[str]) -> tuple[tuple[str, str], ...]:
    env = list(_QUOTAS_OFF)
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.startswith("SHOAL_"):
            raise SystemExit(f"--fleet-env takes SHOAL_NAME=VALUE, not {pair!r}")
        env.append((name, value))
    return tuple(env)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    quick = args.quick
    # Bounded in count and time whatever is asked: this runs on a shared 2-core machine.
    sessions = int(_bounded(args.sessions or (100 if quick else 1_000), 1, 20_000, "sessions"))
    duration = _bounded(args.duration or (3.0 if quick else 10.0), 0.5, 600, "duration")
    warmup = _bounded(
        args.warmup if args.warmup is not None else (1.0 if quick else 2.0), 0, 60, "warmup"
    )
    concurrency = int(_bounded(args.concurrency, 1, 1_024, "concurrency"))
    messages = int(
        _bounded(args.messages or (10_000 if quick else 100_000), 1, 2_000_000, "messages")
    )
    modes = FSYNC_MODES[args.fsync]

    if args.which == "fanout":
        return _fanout(args, quick, duration, warmup)
    if args.which == "jobs":
        return _jobs(args, quick)

    raw: list[RawResult] = []
    shoal: list[CommandResult] = []
    peer: dict[str, Any] | None = None
    failed = False
    try:
        if args.peer and args.which in ("all", "command"):
            peer = run_peer(args.peer, keys=sessions, concurrency=concurrency)
        if args.which in ("all", "raw"):
            raw = run_loop(
                run_raw(
                    RawOptions(
                        messages=messages,
                        keys=sessions,
                        concurrency=concurrency,
                        duration=duration,
                        warmup=warmup,
                        fsync_modes=modes,
                    )
                )
            )
        if args.which in ("all", "command"):
            try:
                shoal = run_loop(
                    run_command_path(
                        CommandOptions(
                            sessions=sessions,
                            concurrency=concurrency,
                            duration=duration,
                            warmup=warmup,
                            fsync_modes=modes,
                            session_replicas=args.session_replicas,
                            keep_dir=args.keep_logs,
                            fleet_env=_fleet_env(args.fleet_env),
                            runners=not args.no_runner,
                        )
                    )
                )
            except Exception as exc:
                # The baseline's figures are still worth printing; the run still fails.
                print(f"command path failed: {type(exc).__name__}: {exc}", file=sys.stderr)
                failed = True
    except KeyboardInterrupt:
        print("interrupted; everything started was stopped", file=sys.stderr)
        return 130
    print(render(raw, shoal))
    if args.peer:
        print(render_peer(peer, shoal))
    if args.json:
        args.json.write_text(json.dumps(figures_json(shoal, peer), indent=2) + "\n")
    return 1 if failed else 0


def _number(value: float, digits: int) -> float | None:
    return None if math.isnan(value) else round(value, digits)


def figures_json(shoal: list[CommandResult], peer: dict[str, Any] | None) -> dict[str, Any]:
    """The command path's figures in a shape that compares across commits."""
    results = []
    for s in shoal:
        path = s.queued
        results.append(
            {
                "fsync": "always" if s.sync_always else "default",
                "runners": s.options.runners,
                "prompts_per_s": _number(path.rate, 1),
                "p50_ms": _number(path.latency.p50, 2),
                "p99_ms": _number(path.latency.p99, 2),
                "cpu_ms_per_prompt": _number(path.cpu_ms_per_command, 3),
                "nats_msgs_per_prompt": round(sum(a + b for a, b in s.traffic.values()), 2),
            }
        )
    if peer is not None:
        peer = {k: v for k, v in peer.items() if k != "raw"}
    return {"results": results, "peer": peer}


def render_peer(peer: dict[str, Any] | None, shoal: list[CommandResult]) -> str:
    """Shoal beside the peer measured in the same run, with the ratio."""
    if peer is None:
        return "peer: not measured (see stderr)\n"
    rate = float(peer["prompts_per_s"] or 0)
    rows = [
        (
            f"peer {peer['name']} (verified: {peer['verified']})",
            fmt(rate, 0),
            f"{fmt(peer['p50_ms'], 2)} / {fmt(peer['p99_ms'], 2)} ms",
            "1.00x",
        )
    ]
    for s in shoal:
        mode = "always" if s.sync_always else "default"
        runners = "" if s.options.runners else ", no runners"
        ratio = f"{s.queued.rate / rate:.2f}x" if rate else "-"
        rows.append(
            (
                f"Shoal, fsync {mode}{runners}",
                fmt(s.queued.rate, 0),
                f"{fmt(s.queued.latency.p50, 2)} / {fmt(s.queued.latency.p99, 2)} ms",
                ratio,
            )
        )
    headers = ("path", "prompts/s", "p50 / p99", "vs peer")
    return table("Beside the peer (same run)", headers, rows) + "\n"


def _fanout(args: argparse.Namespace, quick: bool, duration: float, warmup: float) -> int:
    opened = int(_bounded(args.open or (200 if quick else 5_000), 1, 30_000, "open"))
    idle = int(
        _bounded(
            args.idle if args.idle is not None else (500 if quick else 10_000), 0, 60_000, "idle"
        )
    )
    sessions = int(_bounded(args.sessions or max(1, opened // 10), 1, opened, "sessions"))
    rate = _bounded(args.rate or (500.0 if quick else 2_000.0), 1, 100_000, "rate")
    options = FanoutOptions(
        open=opened,
        idle=idle,
        sessions=sessions,
        rate=rate,
        duration=duration,
        warmup=warmup,
        idle_window=1.0 if quick else FanoutOptions.idle_window,
        clients=int(_bounded(args.clients, 1, 32, "clients")),
        idle_on=args.idle_on,
        baseline=not args.no_baseline,
        shoal=not args.no_shoal,
        keep_dir=args.keep_logs,
        fleet_env=_fleet_env(args.fleet_env),
        stream_max_consumers=int(
            _bounded(args.stream_max_consumers, 0, 1_000_000, "stream-max-consumers")
        ),
        server_core=args.server_core,
    )
    results: list[FanoutResult] = []
    try:
        results = asyncio.run(run_fanout(options))
    except KeyboardInterrupt:
        print("interrupted; everything started was stopped", file=sys.stderr)
        return 130
    machine = table("Machine", ("what", "value"), machine_info())
    print(f"{machine}\n\n{render_fanout(results)}\n")
    return 1 if any(r.errors and r.delivered == 0 for r in results) else 0


def _jobs(args: argparse.Namespace, quick: bool) -> int:
    options = JobsOptions(
        jobs=int(_bounded(args.jobs or (300 if quick else 2_000), 1, 100_000, "jobs")),
        workers=int(_bounded(args.workers, 1, 100, "workers")),
        timers=int(_bounded(args.timers or (1_000 if quick else 10_000), 1, 100_000, "timers")),
        sync_always=args.fsync != "default",
        keep_dir=args.keep_logs,
    )
    try:
        result = run_loop(run_jobs(options))
    except KeyboardInterrupt:
        print("interrupted; everything started was stopped", file=sys.stderr)
        return 130
    machine = table("Machine", ("what", "value"), machine_info())
    print(f"{machine}\n\n{render_jobs(result)}\n")
    return 0


def render(raw: list[RawResult], shoal: list[CommandResult]) -> str:
    """Machine facts, each benchmark's tables, then the side-by-side summary."""
    parts = [table("Machine", ("what", "value"), machine_info())]
    if raw:
        parts.append(render_raw(raw))
    raw_rates = {r.sync_always: r.command_path.rate for r in raw}
    if shoal:
        parts.append(render_command_path(shoal, raw_rates))
    if raw or shoal:
        parts.append(_summary(raw, shoal))
    return "\n\n".join(parts) + "\n"


def _summary(raw: list[RawResult], shoal: list[CommandResult]) -> str:
    rows = []
    for sync_always in (True, False):
        mode = "always" if sync_always else "default"
        for r in raw:
            if r.sync_always == sync_always:
                path = r.command_path
                rows.append(
                    (
                        f"raw command path, fsync {mode}",
                        f"{fmt(path.rate, 0)}",
                        latency_cell(path.latency),
                        "1.00x",
                        str(path.errors),
                    )
                )
        for s in shoal:
            if s.sync_always == sync_always:
                path = s.queued
                base = next((r.command_path.rate for r in raw if r.sync_always == sync_always), 0)
                ratio = f"{path.rate / base:.2f}x" if base else "-"
                rows.append(
                    (
                        f"Shoal prompt -> prompt.queued, fsync {mode}"
                        + ("" if s.options.runners else ", no runners"),
                        f"{fmt(path.rate, 0)}",
                        latency_cell(path.latency),
                        ratio,
                        str(path.errors),
                    )
                )
    headers = ("path", "cmd/s", "p50 / p95 / p99", "vs raw", "errors")
    return table("Summary: commands/s and latency per path", headers, rows)


if __name__ == "__main__":
    sys.exit(main())
