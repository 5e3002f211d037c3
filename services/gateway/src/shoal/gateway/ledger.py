"""Where in a stream a resuming reader starts: replay for the ledger's whole retention, cheaply.

A client that resumes with ``since=N`` should not make the gateway read the session's first N
events again. Session seqs grow with the stream sequence (the session service appends each
session's commits in seq order, fenced on the session's last subject sequence), so the first
stream sequence holding an event with seq > N (a message whose last event's seq, its
``Shoal-Seq`` header or its body, is > N) is found by a binary search of direct gets
(``next_by_subj``: the first message of the session at or after a stream sequence), about
log2(stream length) round trips (~20 for a million messages), then the replay starts
there (``fanout.LiveFeed``: batched direct gets from that stream sequence).

Example::

    start = await start_sequence(js, "SHOAL_SESSION_EVT", "shoal.session.evt.ses_1.>", since=41)
    # None: start at the stream's beginning; else the stream sequence to start at
"""

from __future__ import annotations

from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from shoal.common.errors import Unavailable
from shoal.common.messaging import ledger_last_seq


async def _next_on_subject(
    js: JetStreamContext, stream: str, subject: str, at: int
) -> tuple[int, int] | None:
    """(stream seq, seq of its last event) of the first message on ``subject`` at or after
    ``at``."""
    try:
        msg = await js.get_msg(stream, seq=at, subject=subject, next=True, direct=True)
    except NotFoundError:
        return None
    seq = ledger_last_seq(msg.data or b"{}", msg.headers)
    # A malformed event has no place in the order; treat it as "before" so the search moves on.
    return int(msg.seq or at), seq if seq is not None else -1


async def start_sequence(js: JetStreamContext, stream: str, subject: str, since: int) -> int | None:
    """The stream sequence of the first message on ``subject`` holding an event with seq >
    ``since`` (a commit holding it and older events too: the reader skips those by seq).

    None when the reader should start at the stream's beginning (``since`` is 0, or every
    retained event of the subject is newer). Past the last message when none is newer yet: the
    consumer then waits there for the next one.
    """
    if since <= 0:
        return None
    try:
        info = await js.stream_info(stream)
        first, last = int(info.state.first_seq), int(info.state.last_seq)
        head = await _next_on_subject(js, stream, subject, first)
        if head is None:
            return last + 1
        if head[1] > since:
            return None  # the oldest retained event is already newer (a gap, if > since + 1)
        # Invariant: the answer lies in (head stream seq, hi]; hi = last + 1 means "only new".
        lo, hi = head[0] + 1, last + 1
        while lo < hi:
            mid = (lo + hi) // 2
            found = await _next_on_subject(js, stream, subject, mid)
            if found is None or found[1] > since:
                hi = mid
            else:
                lo = found[0] + 1
        return lo
    except (NatsError, TimeoutError) as exc:
        raise Unavailable(f"cannot position the replay: {exc}") from exc
