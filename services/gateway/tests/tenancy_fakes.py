"""A keys-service stand-in with API keys and secrets, over the real NATS (docs/CONTRACTS.md).

Pure bookkeeping: the real keys service (hashing, encryption, audit) is tested in
services/keys and end to end in tests/test_tenancy_e2e.py.
"""

from __future__ import annotations

import secrets
from typing import Any

from gateway_fakes import FakeKeys
from nats.aio.subscription import Subscription

from shoal.common.errors import BadRequest, NotFound, PayloadTooLarge
from shoal.common.messaging import serve

T0 = "2026-01-01T00:00:00.000Z"

# key -> principal; "key-<owner>-<scope>" keys for the scope matrix.
TENANT_KEYS: dict[str, dict[str, Any]] = {
    "key-alice": {"key_id": "k-alice", "owner": "alice", "scopes": ["sessions", "secrets"]},
    "key-bob": {"key_id": "k-bob", "owner": "bob", "scopes": ["sessions", "secrets"]},
    "key-admin": {"key_id": "k-admin", "owner": "admin", "scopes": ["admin"]},
    **{
        f"key-alice-{scope}": {"key_id": f"k-alice-{scope}", "owner": "alice", "scopes": [scope]}
        for scope in ("sessions", "secrets", "jobs", "read")
    },
}


class FakeTenantKeys(FakeKeys):
    """verify, create, list, revoke and secrets.* over dicts; ``requests`` records each call."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.keys = {k: {**v, "name": k} for k, v in TENANT_KEYS.items()}
        self.secrets: dict[tuple[str, str], tuple[int, str]] = {}
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self._subs: list[Subscription] = []

    async def start(self) -> None:
        routes = {
            "verify": self.verify,
            "create": self.create,
            "list": self.list_keys,
            "revoke": self.revoke_rpc,
            "secrets.put": self.put,
            "secrets.list": self.list_secrets,
            "secrets.get": self.get,
            "secrets.delete": self.delete,
        }
        for method, handler in routes.items():
            self._subs.append(
                await serve(self.nc, self.subjects.rpc("keys", method), "keys", handler)
            )
        await self.nc.flush()

    async def stop(self) -> None:
        for sub in self._subs:
            await sub.unsubscribe()

    async def verify(self, body: dict[str, Any]) -> dict[str, Any]:
        self.requests.append(("verify", {}))
        return await super().verify(body)

    async def create(self, body: dict[str, Any]) -> dict[str, Any]:
        self.requests.append(("create", body))
        key_id = "k" + secrets.token_hex(6)
        key = f"key-{key_id}"
        entry = {"key_id": key_id, "owner": body["owner"], "scopes": body["scopes"]}
        self.keys[key] = {**entry, "name": body["name"]}
        return {
            "id": key_id,
            "key": key,
            "name": body["name"],
            "owner": body["owner"],
            "scopes": body["scopes"],
            "created_at": T0,
            "expires_at": None,
        }

    async def list_keys(self, body: dict[str, Any]) -> dict[str, Any]:
        self.requests.append(("list", body))
        owner = body.get("owner")
        return {
            "keys": [
                {  # the keys service's key_view
                    "id": v["key_id"],
                    "name": v["name"],
                    "owner": v["owner"],
                    "scopes": v["scopes"],
                    "created_at": T0,
                    "expires_at": None,
                    "last_used_at": None,
                    "revoked_at": None,
                }
                for v in self.keys.values()
                if owner is None or v["owner"] == owner
            ]
        }

    async def revoke_rpc(self, body: dict[str, Any]) -> dict[str, Any]:
        self.requests.append(("revoke", body))
        for key, entry in list(self.keys.items()):
            if entry["key_id"] == body["id"]:
                await self.revoke(key)
                return {}
        raise NotFound("key not found")

    async def put(self, body: dict[str, Any]) -> dict[str, Any]:
        self.requests.append(("secrets.put", {k: v for k, v in body.items() if k != "value"}))
        if len(body["value"].encode()) > 64 * 1024:
            raise PayloadTooLarge("a secret value is at most 65536 bytes")
        key = (body["owner"], body["name"])
        version = self.secrets.get(key, (0, ""))[0] + 1
        self.secrets[key] = (version, body["value"])
        return {"name": body["name"], "version": version, "updated_at": T0}

    async def list_secrets(self, body: dict[str, Any]) -> dict[str, Any]:
        self.requests.append(("secrets.list", body))
        return {
            "secrets": [
                {"name": name, "version": v, "created_at": T0, "updated_at": T0}
                for (owner, name), (v, _) in sorted(self.secrets.items())
                if owner == body["owner"]
            ]
        }

    async def get(self, body: dict[str, Any]) -> dict[str, Any]:
        self.requests.append(("secrets.get", body))
        found = self.secrets.get((body["owner"], body["name"]))
        if found is None:
            raise NotFound("secret not found")
        return {"name": body["name"], "value": found[1]}

    async def delete(self, body: dict[str, Any]) -> dict[str, Any]:
        self.requests.append(("secrets.delete", body))
        if not isinstance(body.get("name"), str):
            raise BadRequest("name must be a string")
        return {"deleted": self.secrets.pop((body["owner"], body["name"]), None) is not None}
