"""Request/reply between services over core NATS, with errors carried as :class:`ShoalError`.

A reply is ``{"ok": true, "data": …}`` or ``{"ok": false, "error": {code, message, detail}}``;
the caller gets the data back or the same error class raised.

Example::

    await serve(nc, subjects.rpc("keys", "verify"), "keys", verify_handler)
    data = await request(nc, subjects.rpc("keys", "verify"), {"key": k}, timeout=2)
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout

from shoal.common.errors import ShoalError, Timeout, Unavailable, error_from_dict
from shoal.common.messaging.envelope import dumps, loads
from shoal.common.observability import inject_trace, start_span

log = logging.getLogger(__name__)

Handler = Callable[[dict[str, Any]], Awaitable[Any]]


async def request(nc: NATS, subject: str, body: dict[str, Any], *, timeout: float = 5.0) -> Any:  # noqa: ASYNC109 - passed to nc.request, which cleans up its inbox
    """Call ``subject`` and return the reply's data, or raise the error it carried. The
    current trace goes along as ``traceparent``: the handler's span joins the caller's trace."""
    try:
        msg = await nc.request(subject, dumps(body), timeout=timeout, headers=inject_trace({}))
    except NoRespondersError as exc:
        raise Unavailable(f"no service answers {subject}") from exc
    except NatsTimeout as exc:
        raise Timeout(f"{subject} did not answer within {timeout:.1f}s") from exc
    reply = loads(msg.data)
    if reply.get("ok"):
        return reply.get("data")
    raise error_from_dict(reply.get("error") or {})


async def serve(nc: NATS, subject: str, queue: str, handler: Handler) -> Subscription:
    """Answer requests on ``subject`` in queue group ``queue`` (one replica answers each)."""

    async def on_request(msg: Msg) -> None:
        with start_span(f"rpc {subject}", msg.headers, **{"rpc.system": "nats"}) as span:
            try:
                body = loads(msg.data)
                if not isinstance(body, dict):
                    raise error_from_dict(
                        {"code": "bad_request", "message": "body must be an object"}
                    )
                reply: dict[str, Any] = {"ok": True, "data": await handler(body)}
            except ShoalError as exc:
                reply = {"ok": False, "error": exc.to_dict()}
                span.set_attribute("error.type", exc.code)
            except Exception:
                log.exception("rpc handler for %s failed", subject)
                reply = {"ok": False, "error": {"code": "internal", "message": "internal error"}}
                span.set_attribute("error.type", "internal")
        if msg.reply:
            await msg.respond(dumps(reply))

    sub = await nc.subscribe(subject, queue=queue, cb=on_request)
    # The server registers the interest asynchronously: flush so a request sent the moment
    # the service reports ready cannot find "no responders".
    await nc.flush()
    return sub
