"""A minimal keep-alive HTTP/1.1 client for the load generator's hot path.

The load generator shares this 2-core machine with the fleet it measures, so every
microsecond it spends per request is taken from the services. A general client (httpx)
costs several hundred microseconds of CPU per request; this one writes a request and
parses a response with Content-Length or chunked body in a few tens. Only what the
benchmark needs: no redirects, no TLS, no pipelining, one request at a time per connection.

Example::

    conn = Http1Connection("127.0.0.1", 8470, {"Authorization": "Bearer ..."})
    status, body = await conn.request("POST", "/v1/sessions/s1/prompts", b'{"content":"hi"}')
    await conn.close()
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping


class Http1Connection:
    """One persistent connection; reconnects when the server closed it."""

    def __init__(self, host: str, port: int, headers: Mapping[str, str]) -> None:
        self._host = host
        self._port = port
        extra = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        self._fixed = f"Host: {host}:{port}\r\n{extra}Content-Type: application/json\r\n"
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        """Send one request; its status and body. Retries once on a connection the server
        had closed while idle (keep-alive timeout), never after the request was answered."""
        for attempt in (0, 1):
            fresh = self._writer is None
            if fresh:
                self._reader, self._writer = await asyncio.open_connection(self._host, self._port)
            assert self._reader is not None
            assert self._writer is not None
            head = f"{method} {path} HTTP/1.1\r\n{self._fixed}Content-Length: {len(body)}\r\n\r\n"
            try:
                self._writer.write(head.encode() + body)
                return await self._response(self._reader)
            except (ConnectionError, asyncio.IncompleteReadError):
                await self.close()
                if fresh or attempt == 1:
                    raise
        raise AssertionError("unreachable")

    async def _response(self, reader: asyncio.StreamReader) -> tuple[int, bytes]:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        length: int | None = None
        chunked, keep_alive = False, True
        for line in lines[1:]:
            name, _, value = line.partition(":")
            name = name.strip().lower()
            if name == "content-length":
                length = int(value)
            elif name == "transfer-encoding" and "chunked" in value.lower():
                chunked = True
            elif name == "connection" and "close" in value.lower():
                keep_alive = False
        if chunked:
            body = await self._chunked(reader)
        elif length is not None:
            body = await reader.readexactly(length)
        else:
            body = await reader.read()
            keep_alive = False
        if not keep_alive:
            await self.close()
        return status, body

    @staticmethod
    async def _chunked(reader: asyncio.StreamReader) -> bytes:
        parts: list[bytes] = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")  # no trailers are sent to us
                return b"".join(parts)
            parts.append(await reader.readexactly(size))
            await reader.readexactly(2)

    async def close(self) -> None:
        writer, self._writer, self._reader = self._writer, None, None
        if writer is not None:
            writer.close()
            try:
                await writer.wait_closed()
            except (ConnectionError, OSError):
                pass
