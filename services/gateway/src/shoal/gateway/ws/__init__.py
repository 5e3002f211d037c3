"""WebSocket delivery: the connection machinery, the client and runner protocols, the frames.

Routes stay declared in ``shoal.gateway.api``; they hand the socket to :func:`serve_client`,
:func:`serve_runner` or :func:`serve_user`, which share one handshake
(``connection.handshake``). Every server -> client frame and close code is in ``frames``.
"""

from shoal.gateway.ws.client import serve_client, serve_user
from shoal.gateway.ws.connection import DirectWebSocket, SocketHub
from shoal.gateway.ws.runner import serve_runner

__all__ = ["DirectWebSocket", "SocketHub", "serve_client", "serve_runner", "serve_user"]
