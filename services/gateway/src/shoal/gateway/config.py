"""Gateway settings (``SHOAL_*`` environment variables on top of :class:`CommonSettings`).

Example::

    settings = GatewaySettings(nats_url="nats://127.0.0.1:4222", http_port=8470)
"""

from __future__ import annotations

from datetime import timedelta

from pydantic import Field

from shoal.common.settings import CommonSettings

MiB = 1024 * 1024
KiB = 1024


class GatewaySettings(CommonSettings):
    """What the gateway needs beyond the common settings: limits, timeouts, the auth cache."""

    service_name: str = "gateway"
    http_port: int = Field(default=8470, ge=0, le=65535)

    # -- limits --
    # Largest HTTP request body (bytes); larger ones get 413 before the route runs.
    max_body_bytes: int = Field(default=1 * MiB, ge=1 * KiB)
    # Largest file a PUT /v1/sessions/{id}/files/{path} may store (bytes; buffered in memory,
    # so it bounds one upload's RAM). Replaces max_body_bytes for those requests; beyond: 413.
    max_file_bytes: int = Field(default=25 * MiB, ge=1)
    # Largest WebSocket frame a client or runner may send (bytes); larger closes with 1009.
    # Keep uvicorn's ws_max_size at or above it (its default is 16 MiB).
    max_ws_frame_bytes: int = Field(default=1 * MiB, ge=1 * KiB)
    # Frames waiting to be written to one socket. A client that stays behind by this many
    # frames for longer than ``ws_lag_grace`` is closed with 4408 and resumes from its last seq.
    ws_send_queue: int = Field(default=1024, ge=8)
    ws_lag_grace: timedelta = timedelta(seconds=5)
    # A prompt lives in the session's hot state (KV, 1 MiB per value) while it waits: keep it small.
    max_prompt_bytes: int = Field(default=64 * KiB, ge=1)
    max_metadata_bytes: int = Field(default=16 * KiB, ge=2)
    max_idempotency_key_chars: int = Field(default=200, ge=1)
    messages_page_max: int = Field(default=200, ge=1)
    messages_page_default: int = Field(default=50, ge=1)
    # GET /v1/sessions and GET /v1/sessions/{id}/events page sizes.
    sessions_page_max: int = Field(default=100, ge=1)
    sessions_page_default: int = Field(default=20, ge=1)
    events_page_max: int = Field(default=500, ge=1)
    events_page_default: int = Field(default=100, ge=1)

    # -- quotas (over one: 429 with Retry-After; a socket upgrade is closed with 1013) --
    # Requests per API key, HTTP routes and socket upgrades alike: a token bucket refilled at
    # ``rate_limit_per_key`` per second up to ``rate_limit_burst``. Buckets of this many keys
    # are kept (least recently used dropped: such a key starts again with a full bucket).
    # A platform's backend often acts for all its users with one key: the default is sized
    # for that, not for one end user (0: no limit).
    rate_limit_per_key: float = Field(default=500.0, ge=0)
    rate_limit_burst: int = Field(default=1000, ge=1)
    rate_limit_keys: int = Field(default=100_000, ge=1)
    # Open sockets per owner on this gateway (client and user sockets; 0: no cap).
    max_sockets_per_owner: int = Field(default=10_000, ge=0)
    # Live (not terminated) sessions per owner; POST /v1/sessions beyond gets 429 (0: no cap).
    # Counted from the session index and trusted for ``session_count_ttl``.
    max_sessions_per_owner: int = Field(default=10_000, ge=0)
    session_count_ttl: timedelta = Field(default=timedelta(seconds=5), gt=timedelta(0))

    # -- session defaults (POST /v1/sessions without them) --
    # Idle this long (nothing running or queued) the session hibernates; bounds 1 s..7 days.
    session_idle_timeout: timedelta = Field(
        default=timedelta(seconds=900), ge=timedelta(seconds=1), le=timedelta(days=30)
    )
    # A running prompt with no runner frame this long fails; bounds 1 s..1 day.
    session_prompt_timeout: timedelta = Field(
        default=timedelta(seconds=600), ge=timedelta(seconds=1), le=timedelta(days=1)
    )

    # -- CORS (browsers calling the HTTP API from another origin) --
    # Off while ``cors_allow_origins`` is empty (the default). ``SHOAL_CORS_ALLOW_ORIGINS`` is a
    # JSON list, e.g. '["https://app.example.com"]'; "*" allows any origin. The API authenticates
    # with Bearer headers, not cookies, so credentials stay off unless asked for.
    cors_allow_origins: list[str] = Field(default_factory=list)
    cors_allow_methods: list[str] = Field(
        default_factory=lambda: ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
    )
    cors_allow_headers: list[str] = Field(
        default_factory=lambda: ["Authorization", "Content-Type", "Last-Event-ID", "X-Request-ID"]
    )
    cors_expose_headers: list[str] = Field(
        default_factory=lambda: ["X-Request-ID", "WWW-Authenticate"]
    )
    cors_allow_credentials: bool = False
    # How long a browser may cache a preflight answer.
    cors_max_age: timedelta = timedelta(minutes=10)

    # -- auth --
    # How long a verified API key is trusted without asking the keys service again. A revocation
    # broadcast drops the entry at once; the TTL bounds staleness if that broadcast is missed.
    auth_cache_ttl: timedelta = timedelta(seconds=5)
    auth_cache_size: int = Field(default=10_000, ge=1)
    # Sessions whose owner this gateway remembers (an owner never changes): a prompt to one of
    # them skips reading the session's state.
    owner_cache_size: int = Field(default=100_000, ge=1)

    # -- timeouts --
    # How long a route waits for the session service to apply a command (the command itself is
    # durable once JetStream acknowledged it; the caller gets 504 and may poll).
    command_timeout: timedelta = timedelta(seconds=10)
    publish_timeout: timedelta = timedelta(seconds=5)
    rpc_timeout: timedelta = timedelta(seconds=5)
    # Time to let sockets flush their close frames when the gateway stops.
    ws_close_timeout: timedelta = timedelta(seconds=2)

    # -- streaming --
    # Bytes waiting to be written to one socket, on top of the frame count above: a client that
    # stays this far behind for ``ws_lag_grace`` is closed with 4408 like one past the count.
    ws_send_queue_bytes: int = Field(default=8 * MiB, ge=64 * KiB)
    # How long a lagging socket's 4408 close frame may wait behind the bytes the peer has not
    # read yet (its outbox is freed at once; only the transport's bounded buffer stays).
    ws_lag_close_timeout: timedelta = timedelta(seconds=30)
    # Browser origins allowed to open sockets and SSE streams (``SHOAL_WS_ALLOWED_ORIGINS``, a JSON
    # list, e.g. '["https://app.example.com"]'; "*" allows any). Same-origin requests and clients
    # that send no Origin (CLIs, runners) are always allowed; a foreign Origin is closed with 4403.
    ws_allowed_origins: list[str] = Field(default_factory=list)
    # Frames one socket may send: a token bucket refilled at ``ws_rate_limit`` per second up to
    # ``ws_rate_burst``. Past it the socket is closed with 1008.
    ws_rate_limit: float = Field(default=50.0, gt=0)
    ws_rate_burst: int = Field(default=200, ge=1)
    # A runner streams deltas at full rate: its socket gets its own, higher limit.
    ws_runner_rate_limit: float = Field(default=2000.0, gt=0)
    ws_runner_rate_burst: int = Field(default=4000, ge=1)
    # Heartbeat grace: a runner socket with no frame from its runner this long (a ``ping``,
    # ``heartbeat`` or any other frame counts; ``shoal.client`` pings every 30 s) is declared
    # gone: closed with 1001 and ``runner.disconnect`` {reason: "heartbeat"} (0 turns it off).
    ws_runner_idle_timeout: timedelta = timedelta(seconds=60)
    # A runner's activity (``heartbeat`` frames, deltas) becomes at most one ``runner.heartbeat``
    # command per connection this often (and at least every quarter of its prompt_timeout).
    ws_runner_heartbeat_interval: timedelta = Field(default=timedelta(seconds=5), gt=timedelta(0))
    # A socket whose peer sent no frame (a ``{"type":"ping"}`` counts) for this long is closed
    # with 1001 (0 turns it off). Protocol-level pings (uvicorn) detect dead peers separately.
    ws_idle_timeout: timedelta = timedelta(seconds=120)
    ws_ping_interval: timedelta = timedelta(seconds=20)
    ws_ping_timeout: timedelta = timedelta(seconds=20)
    # Lifetime of a ticket from POST /v1/ws-tickets (single use; at most 5 minutes).
    ws_ticket_ttl: timedelta = timedelta(seconds=30)
    # SSE comment lines sent when no event came for this long (keeps proxies from timing out).
    sse_keepalive: timedelta = timedelta(seconds=15)
    # Runner proxy: largest request or response body (bytes; both travel base64 in one NATS
    # message, whose default limit is 1 MiB) and how long a runner may take to answer.
    proxy_max_body_bytes: int = Field(default=512 * KiB, ge=1)
    proxy_timeout: timedelta = timedelta(seconds=30)
