"""Event frames written straight to the transport (``shoal.gateway.ws.frames``): the encoding,
checked by websockets' own parser, and the sockets that use it — or fall back to the ASGI send."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import pytest
from gateway_fakes import FakeKeys, FakeSessionService, flood_until_cut_off
from uvicorn.config import Config
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from uvicorn.server import ServerState
from websockets.asyncio.client import ClientConnection, connect
from websockets.client import ClientProtocol
from websockets.exceptions import ConnectionClosed
from websockets.frames import Frame, Opcode
from websockets.protocol import State
from websockets.uri import parse_uri

from shoal.client import ShoalClient
from shoal.common.service import ServiceServer, server_config
from shoal.gateway.api.deps import gateway_state
from shoal.gateway.app import create_app
from shoal.gateway.config import GatewaySettings
from shoal.gateway.ws.frames import direct_protocol, text_frame, writable

if TYPE_CHECKING:  # the fixture's type (see test_gateway_ws.py)
    from conftest import RunningGateway

ALICE = {"Authorization": "Bearer key-alice"}


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    return {"ws_send_queue": 8, "ws_lag_grace": timedelta(seconds=0.3)}


@pytest.fixture
def asgi_sends(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Every ``websocket.send`` that went through uvicorn's ASGI ``send`` (the path the direct
    writes replace), in this process. A spy on the server's side of the ASGI boundary: it
    delegates to uvicorn's own ``send``, which stays what ``direct_protocol`` recognises."""
    sent: list[dict[str, Any]] = []
    original = WebSocketsSansIOProtocol.send

    async def send(self: WebSocketsSansIOProtocol, message: Any) -> None:
        if message["type"] == "websocket.send":
            sent.append(message)
        await original(self, message)

    monkeypatch.setattr(WebSocketsSansIOProtocol, "send", send)
    return sent


# -- the encoding --


def _parsed(wire: bytes) -> list[Frame]:
    """What a client makes of ``wire``: websockets' own sans-I/O parser, in the OPEN state."""
    client = ClientProtocol(parse_uri("ws://gateway/"), state=State.OPEN, max_size=None)
    client.receive_data(wire)
    assert client.parser_exc is None
    return [event for event in client.events_received() if isinstance(event, Frame)]


@pytest.mark.parametrize(
    ("size", "header"),
    [
        (0, 2),
        (125, 2),  # 7-bit length
        (126, 4),
        (65_535, 4),  # 16-bit length
        (65_536, 10),
        (200_000, 10),  # 64-bit length
    ],
)
def test_text_frame_length_forms(size: int, header: int) -> None:
    payload = b"x" * size
    wire = text_frame(payload)
    assert len(wire) == header + size
    assert wire == Frame(Opcode.TEXT, payload).serialize(mask=False, extensions=[])
    [frame] = _parsed(wire)
    assert frame.opcode is Opcode.TEXT
    assert frame.fin
    assert frame.data == payload


def test_text_frames_back_to_back_utf8() -> None:
    texts = ['{"type":"event","seq":1}', "é" * 100, "😀" * 40_000]  # 200 B / 160 KB of UTF-8
    frames = _parsed(b"".join(text_frame(text.encode()) for text in texts))
    assert [bytes(frame.data).decode() for frame in frames] == texts


def test_direct_protocol_only_for_uvicorns_own_send() -> None:
    async def send(message: Any) -> None:
        pass

    class Wrapped:
        async def send(self, message: Any) -> None:
            pass

    assert direct_protocol(None) is None
    assert direct_protocol(send) is None
    assert direct_protocol(Wrapped().send) is None


# -- sockets --


async def _ws_connect(url: str, **kwargs: Any) -> ClientConnection:
    return await connect(url, additional_headers=ALICE, **kwargs)


async def _recv_json(conn: ClientConnection) -> dict[str, Any]:
    return dict(json.loads(await asyncio.wait_for(conn.recv(), 10)))


async def _read_seqs_until_closed(conn: ClientConnection, seqs: list[int]) -> None:
    while True:
        seqs.append((await _recv_json(conn))["seq"])


async def test_client_socket_receives_through_direct_writes_then_lags_4408(
    keys: FakeKeys,
    sessions: FakeSessionService,
    alice: ShoalClient,
    gateway: RunningGateway,
    asgi_sends: list[dict[str, Any]],
) -> None:
    created = await alice.create_session()  # seq 1
    await sessions.emit(created.id, "session.status", {"status": "idle"})  # 2
    conn = await _ws_connect(
        f"{gateway.ws_url}/v1/sessions/{created.id}/ws", compression=None, max_queue=1
    )
    replay = [await _recv_json(conn), await _recv_json(conn)]  # from the ledger
    assert [frame["seq"] for frame in replay] == [1, 2]
    for n in range(20):  # live: one frame built per event, written as is
        await sessions.emit(created.id, "message.delta", {"text": f"d{n}" * 50})
    live = [await _recv_json(conn) for _ in range(20)]
    assert [frame["seq"] for frame in live] == list(range(3, 23))
    assert live[0]["event"]["data"]["text"] == "d0" * 50
    await conn.send(json.dumps({"type": "ping", "id": "p"}))
    assert await _recv_json(conn) == {"type": "pong", "ref": "p"}
    assert asgi_sends == []  # replay, live and the pong: none through the ASGI send

    # A client that stops reading: its transport pushes back, the ASGI send and the writer take
    # over, the bounded outbox fills, and the socket is cut off with the exact resume seq.
    await flood_until_cut_off(sessions, created.id, gateway_state(gateway.app).hub)
    assert asgi_sends  # the slow path was taken
    seqs: list[int] = []
    with pytest.raises(ConnectionClosed) as caught:
        await _read_seqs_until_closed(conn, seqs)
    assert caught.value.rcvd is not None
    assert caught.value.rcvd.code == 4408
    assert caught.value.rcvd.reason == f"lagging: resume from seq {seqs[-1]}"
    assert seqs == list(range(23, seqs[-1] + 1))


async def test_compression_negotiated_keeps_the_asgi_send(
    keys: FakeKeys,
    sessions: FakeSessionService,
    settings: GatewaySettings,
    asgi_sends: list[dict[str, Any]],
) -> None:
    """With permessage-deflate on (not Shoal's configuration) frames differ per connection: the
    socket sends through uvicorn as before, and the client still gets every event."""
    app = create_app(settings)
    server = ServiceServer(
        server_config(app, settings, log_level="warning", ws_per_message_deflate=True)
    )
    serving = asyncio.create_task(server.serve())
    try:
        async with asyncio.timeout(15):
            while not server.started:
                if serving.done():
                    serving.result()  # surface the start-up error
                await asyncio.sleep(0.02)
        base = f"http://{settings.http_host}:{settings.http_port}"
        async with ShoalClient(base, "key-alice") as client:
            created = await client.create_session()
        url = f"ws://{settings.http_host}:{settings.http_port}/v1/sessions/{created.id}/ws"
        conn = await _ws_connect(url, compression="deflate")
        assert conn.protocol.extensions  # negotiated
        assert (await _recv_json(conn))["seq"] == 1
        await sessions.emit(created.id, "session.status", {"status": "idle"})
        assert (await _recv_json(conn))["seq"] == 2
        assert len(asgi_sends) == 2
        await conn.close()
    finally:
        server.should_exit = True
        await asyncio.wait_for(serving, 15)


# -- when a direct write is allowed: a real uvicorn protocol on a transport that records writes --


class _Transport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written: list[bytes] = []
        self.closing = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 8470) if name in ("sockname", "peername") else default

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


@dataclass
class _Accepted:
    protocol: WebSocketsSansIOProtocol
    transport: _Transport
    send: Any  # the ASGI send the app was given
    stop: asyncio.Event
    state: ServerState

    async def close(self) -> None:
        """End the app and wait for its task."""
        self.stop.set()
        await asyncio.wait_for(asyncio.gather(*self.state.tasks), 5)


async def _accepted(deflate: bool = False) -> _Accepted:
    """A protocol whose app accepted the socket (no server: the transport only records)."""
    accepted: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    stop = asyncio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()  # websocket.connect
        await send({"type": "websocket.accept"})
        accepted.set_result(send)
        await stop.wait()

    config = Config(app=app, ws="websockets-sansio", ws_per_message_deflate=deflate)
    config.load()
    state = ServerState()
    protocol = WebSocketsSansIOProtocol(config, state, {})
    transport = _Transport()
    protocol.connection_made(transport)
    extensions = "Sec-WebSocket-Extensions: permessage-deflate\r\n" if deflate else ""
    protocol.data_received(
        b"GET /ws HTTP/1.1\r\nHost: gateway\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        + extensions.encode()
        + b"\r\n"
    )
    send = await asyncio.wait_for(accepted, 5)
    return _Accepted(protocol, transport, send, stop, state)


async def test_direct_writes_only_while_open_and_not_paused() -> None:
    accepted = await _accepted()
    protocol, transport = accepted.protocol, accepted.transport
    try:
        assert direct_protocol(accepted.send) is protocol
        assert writable(protocol)
        protocol.pause_writing()  # above the transport's high-water mark
        assert not writable(protocol)
        protocol.resume_writing()
        assert writable(protocol)
        transport.closing = True
        assert not writable(protocol)
        transport.closing = False
        # The peer's close frame (masked, code 1000): the connection is closing.
        protocol.data_received(bytes([0x88, 0x82, 0, 0, 0, 0, 0x03, 0xE8]))
        assert not writable(protocol)
    finally:
        await accepted.close()


async def test_no_direct_writes_after_the_app_closes_or_with_compression() -> None:
    accepted = await _accepted()
    try:
        await accepted.send({"type": "websocket.close", "code": 1000})
        assert not writable(accepted.protocol)
    finally:
        await accepted.close()
    accepted = await _accepted(deflate=True)
    try:
        assert accepted.protocol.conn.extensions  # negotiated: frames differ per connection
        assert direct_protocol(accepted.send) is None
    finally:
        await accepted.close()
