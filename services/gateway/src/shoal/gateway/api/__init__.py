"""HTTP and WebSocket transport of the gateway: decode, call :mod:`shoal.gateway.service`, map."""

from shoal.gateway.api.routes import router

__all__ = ["router"]
