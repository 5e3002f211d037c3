"""Messaging: subjects, envelopes, the stream/KV catalog and its provisioning, RPC.

Example::

    from shoal.common.messaging import Subjects, Envelope, encode, decode, partition
"""

from shoal.common.messaging.catalog import Catalog, provision
from shoal.common.messaging.connection import connect_nats
from shoal.common.messaging.envelope import (
    MSG_ID_HEADER,
    REPLY_TO_HEADER,
    TRACEPARENT_HEADER,
    Envelope,
    decode,
    dumps,
    encode,
    loads,
    new_id,
)
from shoal.common.messaging.ledger import (
    LEDGER_SEQ_HEADER,
    commit_body,
    encode_commit,
    ledger_events,
    ledger_last_seq,
    ledger_raw_events,
)
from shoal.common.messaging.partition import fnv1a32, partition
from shoal.common.messaging.rpc import request, serve
from shoal.common.messaging.subjects import Subjects, is_token

__all__ = [
    "LEDGER_SEQ_HEADER",
    "MSG_ID_HEADER",
    "REPLY_TO_HEADER",
    "TRACEPARENT_HEADER",
    "Catalog",
    "Envelope",
    "Subjects",
    "commit_body",
    "connect_nats",
    "decode",
    "dumps",
    "encode",
    "encode_commit",
    "fnv1a32",
    "is_token",
    "ledger_events",
    "ledger_last_seq",
    "ledger_raw_events",
    "loads",
    "new_id",
    "partition",
    "provision",
    "request",
    "serve",
]
