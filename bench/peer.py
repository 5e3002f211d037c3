"""A peer system's figures, measured in the same run as Shoal's (``--peer restate``).

The peer harness lives outside this repository (``../shared/peers/<name>/run_peer.sh``): it
installs, starts, loads and stops its own processes and prints one JSON line last on stdout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

PEERS_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "peers"
PEER_TIMEOUT = 900.0  # s: install + run; the harness stops what it started on SIGTERM


def peer_script(name: str) -> Path | None:
    """The peer's harness, if it is there (``../shared/peers/<name>/run_peer.sh``)."""
    for root in (PEERS_DIR, Path("/work/shared/peers")):
        script = root / name / "run_peer.sh"
        if script.is_file():
            return script
    return None


def run_peer(name: str, *, keys: int, concurrency: int) -> dict[str, Any] | None:
    """Run the peer harness and return its figures, or None (with a note) if it is absent
    or failed. Progress of the harness goes to stderr."""
    script = peer_script(name)
    if script is None:
        print(f"peer {name}: no harness found under {PEERS_DIR}; skipped", file=sys.stderr)
        return None
    env = {"KEYS": str(keys), "CONCURRENCY": str(concurrency)}
    print(f"peer {name}: running {script}", file=sys.stderr)
    try:
        done = subprocess.run(
            ["bash", str(script)],
            env={**os.environ, **env},
            stdout=subprocess.PIPE,
            text=True,
            timeout=PEER_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        print(f"peer {name}: no answer within {PEER_TIMEOUT:.0f} s; skipped", file=sys.stderr)
        return None
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        print(f"peer {name}: harness failed (exit {done.returncode})", file=sys.stderr)
        return None
    figures: dict[str, Any] = json.loads(lines[-1])
    summary = figures.get("summary", {})
    return {
        "name": name,
        "prompts_per_s": summary.get("b_throughput_per_s"),
        "p50_ms": summary.get("b_p50_ms"),
        "p99_ms": summary.get("b_p99_ms"),
        "verified": summary.get("verified"),
        "raw": figures,
    }
