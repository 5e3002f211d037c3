"""``python -m bench [raw|command|all]``: run the benchmarks and print their tables.

See bench/README.md for what each figure means. Progress goes to stderr, tables to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from bench._report import fmt, latency_cell, machine_info, table
from bench.command_path import (
    CommandOptions,
    CommandResult,
    render_command_path,
    run_command_path,
)
from bench.raw_jetstream import RawOptions, RawResult, render_raw, run_raw

FSYNC_MODES = {"always": (True,), "default": (False,), "both": (True, False)}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description="Shoal benchmarks (figures only; nothing asserts)."
    )
    parser.add_argument(
        "which",
        nargs="?",
        choices=("all", "raw", "command"),
        default="all",
        help="raw: the JetStream baseline; command: Shoal's command path; all: both (default)",
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
        "--fleet-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a setting for every service process (e.g. SHOAL_MAX_IN_FLIGHT=6400); repeatable",
    )
    parser.add_argument(
        "--keep-logs", action="store_true", help="keep the fleet's temporary directory and logs"
    )
    return parser


def _bounded(value: float, low: float, high: float, name: str) -> float:
    if not low <= value <= high:
        raise SystemExit(f"--{name} must be between {low:g} and {high:g}")
    return value


def _fleet_env(pairs: list[str]) -> tuple[tuple[str, str], ...]:
    env = []
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

    raw: list[RawResult] = []
    shoal: list[CommandResult] = []
    failed = False
    try:
        if args.which in ("all", "raw"):
            raw = asyncio.run(
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
                shoal = asyncio.run(
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
    return 1 if failed else 0


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
                        f"Shoal prompt -> prompt.queued, fsync {mode}",
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
