"""Every subject, stream and bucket name, built from one configurable prefix.

Example::

    s = Subjects("shoal")
    s.session_command("ses_1")               # "shoal.session.cmd.ses_1"
    s.session_commit("ses_1")                # "shoal.session.evt.ses_1.commit"
    s.session_events("ses_1")                # "shoal.session.evt.ses_1.>"
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Ids that become one subject token: no dots, wildcards or whitespace.
TOKEN_RE = re.compile(r"^[A-Za-z0-9_-]{1,128}$")


def is_token(value: str) -> bool:
    """Whether ``value`` can be used as a single subject token (an id)."""
    return bool(TOKEN_RE.match(value))


@dataclass(frozen=True, slots=True)
class Subjects:
    prefix: str = "shoal"

    # -- streams and buckets (names are upper/lower-cased prefix + role) --
    @property
    def session_cmd_stream(self) -> str:
        return f"{self.prefix.upper()}_SESSION_CMD"

    @property
    def session_evt_stream(self) -> str:
        return f"{self.prefix.upper()}_SESSION_EVT"

    @property
    def deliver_stream(self) -> str:
        return f"{self.prefix.upper()}_DELIVER"

    @property
    def jobs_stream(self) -> str:
        return f"{self.prefix.upper()}_JOBS"

    @property
    def session_state_bucket(self) -> str:
        return f"{self.prefix}-session-state"

    @property
    def session_leases_bucket(self) -> str:
        return f"{self.prefix}-session-leases"

    @property
    def session_members_bucket(self) -> str:
        return f"{self.prefix}-session-members"

    @property
    def ws_tickets_bucket(self) -> str:
        """Short-lived, single-use WebSocket/SSE tickets (keys are ticket hashes)."""
        return f"{self.prefix}-ws-tickets"

    # -- session commands --
    @property
    def session_cmd_ingest(self) -> str:
        """What the stream listens on (one token after ``cmd``)."""
        return f"{self.prefix}.session.cmd.*"

    def session_command(self, session_id: str) -> str:
        """Where a command for ``session_id`` is published."""
        return f"{self.prefix}.session.cmd.{session_id}"

    def session_partition_filter(self, partition: int) -> str:
        """The stored (transformed) subjects of one partition."""
        return f"{self.prefix}.session.cmd.{partition}.*"

    def session_cmd_transform_dest(self, partitions: int) -> str:
        return f"{self.prefix}.session.cmd.{{{{partition({partitions},1)}}}}.{{{{wildcard(1)}}}}"

    # -- session events --
    @property
    def session_evt_all(self) -> str:
        return f"{self.prefix}.session.evt.>"

    def session_event(self, session_id: str, event_type: str) -> str:
        """One event per message: how older versions wrote the ledger (still read)."""
        return f"{self.prefix}.session.evt.{session_id}.{event_type}"

    def session_commit(self, session_id: str) -> str:
        """Where one command's events are written, as one message (``messaging.ledger``)."""
        return f"{self.prefix}.session.evt.{session_id}.commit"

    def session_events(self, session_id: str) -> str:
        """Filter for every event of one session."""
        return f"{self.prefix}.session.evt.{session_id}.>"

    @property
    def session_live_all(self) -> str:
        """Where SESSION_EVT re-publishes what it stored (RePublish): live fan-out, core NATS."""
        return f"{self.prefix}.live.session.evt.>"

    def session_live(self, session_id: str) -> str:
        """The stored events of one session, re-published (headers carry ``Nats-Sequence``)."""
        return f"{self.prefix}.live.session.evt.{session_id}.>"

    def session_delta(self, session_id: str) -> str:
        """Core NATS (not the ledger): a runner's streaming ``message.delta`` frames, ephemeral."""
        return f"{self.prefix}.session.delta.{session_id}"

    def session_proxy(self, session_id: str) -> str:
        """Core NATS request/reply: an HTTP request for the session's runner (runner proxy)."""
        return f"{self.prefix}.session.proxy.{session_id}"

    # -- eventbus delivery --
    @property
    def deliver_all(self) -> str:
        return f"{self.prefix}.deliver.>"

    def deliver_user(self, user: str) -> str:
        return f"{self.prefix}.deliver.user.{user}"

    @property
    def deliver_live_all(self) -> str:
        """Where DELIVER re-publishes what it stored (RePublish): live fan-out, core NATS."""
        return f"{self.prefix}.live.deliver.>"

    def deliver_live_user(self, user: str) -> str:
        return f"{self.prefix}.live.deliver.user.{user}"

    def deliver_tag(self, owner: str, tag: str) -> str:
        """The events of ``owner``'s sessions tagged ``tag`` (owner-scoped: tags are not global)."""
        return f"{self.prefix}.deliver.tag.{owner}.{tag}"

    def deliver_live_tag(self, owner: str, tag: str) -> str:
        return f"{self.prefix}.live.deliver.tag.{owner}.{tag}"

    # -- jobs --
    @property
    def jobs_all(self) -> str:
        return f"{self.prefix}.jobs.>"

    def job(self, kind: str) -> str:
        return f"{self.prefix}.jobs.{kind}"

    # -- request/reply between services --
    def rpc(self, service: str, method: str) -> str:
        """E.g. ``rpc("keys", "verify")`` -> ``shoal.rpc.keys.verify``."""
        return f"{self.prefix}.rpc.{service}.{method}"

    def broadcast(self, topic: str) -> str:
        """Core-NATS fan-out to every replica, e.g. key revocations."""
        return f"{self.prefix}.bcast.{topic}"
