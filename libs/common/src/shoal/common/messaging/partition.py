"""The session partition function, identical to the server's ``{{partition(P,1)}}`` transform.

nats-server computes FNV-1a 32-bit over the selected subject tokens (joined without a
separator) and takes it modulo P. Tests check this against a real server on thousands of ids.

Example::

    partition("ses_01j9z", 64)   # -> the partition SESSION_CMD stores the command under
"""

from __future__ import annotations

_FNV32_OFFSET = 0x811C9DC5
_FNV32_PRIME = 0x01000193


def fnv1a32(data: bytes) -> int:
    """FNV-1a, 32 bit."""
    h = _FNV32_OFFSET
    for byte in data:
        h ^= byte
        h = (h * _FNV32_PRIME) & 0xFFFFFFFF
    return h


def partition(key: str, partitions: int) -> int:
    """The partition (0..partitions-1) the server assigns to a one-token ``key``."""
    return fnv1a32(key.encode()) % partitions
