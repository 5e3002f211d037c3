"""NATS credentials and TLS against a real nats-server: mutual TLS with an NKey user, and a
``.creds`` file (user JWT + seed) on a server in operator mode."""

from __future__ import annotations

import base64
import datetime as dt
import json
import secrets
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import nkeys
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from pydantic import ValidationError

from shoal.common.errors import Unavailable
from shoal.common.messaging.connection import connect_nats
from shoal.common.settings import CommonSettings
from shoal.devtools.embedded import free_port, nats_server_binary, wait_for_port


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def _certificate(
    name: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None,
    *,
    ca: bool = False,
) -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_name, issuer_key = issuer or (subject, key)
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        import ipaddress

        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256())


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, as PEM files."""
    files: dict[str, Path] = {}
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = _certificate("shoal test CA", ca_key, None, ca=True)
    files["ca"] = tmp_path / "ca.pem"
    files["ca"].write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    for name in ("server", "client"):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _certificate(name, key, (ca_cert.subject, ca_key))
        files[f"{name}_cert"] = tmp_path / f"{name}.pem"
        files[f"{name}_cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        files[f"{name}_key"] = tmp_path / f"{name}-key.pem"
        _write_key(files[f"{name}_key"], key)
    return files


def _new_keypair(prefix: int) -> nkeys.KeyPair:
    seed = nkeys.encode_seed(secrets.token_bytes(32), prefix)
    return nkeys.from_seed(bytearray(seed))


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _jwt(issuer: nkeys.KeyPair, subject: str, nats_claims: dict[str, object]) -> str:
    """A NATS JWT (v2): ed25519-nkey signed by ``issuer``."""
    header = _b64(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())
    claims = {
        "jti": secrets.token_hex(16).upper(),
        "iat": int(time.time()),
        "iss": issuer.public_key.decode(),
        "name": subject[:8],
        "sub": subject,
        "nats": {**nats_claims, "version": 2},
    }
    payload = _b64(json.dumps(claims).encode())
    signature = _b64(issuer.sign(f"{header}.{payload}".encode()))
    return f"{header}.{payload}.{signature}"


def _start_server(tmp_path: Path, config: str) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    conf = tmp_path / "nats.conf"
    conf.write_text(f"listen: 127.0.0.1:{port}\n{config}")
    log = (tmp_path / "nats.log").open("ab")
    proc = subprocess.Popen(
        [nats_server_binary(), "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT
    )
    log.close()
    wait_for_port(port, 10, proc)
    return proc, port


@pytest.fixture
def stop_on_exit() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        proc.terminate()
        proc.wait(10)


async def _round_trip(settings: CommonSettings) -> None:
    nc = await connect_nats(settings, name="auth-test")
    try:
        sub = await nc.subscribe("auth.ping")
        await nc.publish("auth.ping", b"pong")
        message = await sub.next_msg(timeout=5)
        assert message.data == b"pong"
    finally:
        await nc.close()


async def test_mutual_tls_and_an_nkey_seed_file(
    tmp_path: Path, pki: dict[str, Path], stop_on_exit: list[subprocess.Popen[bytes]]
) -> None:
    user = _new_keypair(nkeys.PREFIX_BYTE_USER)
    seed_file = tmp_path / "user.nk"
    seed_file.write_bytes(user.seed)
    proc, port = _start_server(
        tmp_path,
        f"""
tls {{
  cert_file: "{pki["server_cert"]}"
  key_file: "{pki["server_key"]}"
  ca_file: "{pki["ca"]}"
  verify: true
}}
authorization {{ users = [ {{ nkey: "{user.public_key.decode()}" }} ] }}
""",
    )
    stop_on_exit.append(proc)
    tls = {
        "nats_tls_ca_file": pki["ca"],
        "nats_tls_cert_file": pki["client_cert"],
        "nats_tls_key_file": pki["client_key"],
    }
    url = f"tls://127.0.0.1:{port}"
    connect_timeout = dt.timedelta(seconds=2)
    await _round_trip(
        CommonSettings(
            nats_url=url, nats_connect_timeout=connect_timeout, nats_nkey_seed_file=seed_file, **tls
        )
    )
    # Without the seed the server refuses the client; without the CA the client refuses the server.
    with pytest.raises(Unavailable, match="cannot connect to NATS"):
        await _round_trip(CommonSettings(nats_url=url, nats_connect_timeout=connect_timeout, **tls))
    with pytest.raises(Unavailable, match="cannot connect to NATS"):
        await _round_trip(
            CommonSettings(
                nats_url=url,
                nats_connect_timeout=connect_timeout,
                nats_nkey_seed_file=seed_file,
                nats_tls_cert_file=pki["client_cert"],
                nats_tls_key_file=pki["client_key"],
            )
        )


async def test_a_creds_file_on_a_server_in_operator_mode(
    tmp_path: Path, stop_on_exit: list[subprocess.Popen[bytes]]
) -> None:
    operator = _new_keypair(nkeys.PREFIX_BYTE_OPERATOR)
    account = _new_keypair(nkeys.PREFIX_BYTE_ACCOUNT)
    user = _new_keypair(nkeys.PREFIX_BYTE_USER)
    unlimited = {"subs": -1, "data": -1, "payload": -1}
    operator_jwt = _jwt(operator, operator.public_key.decode(), {"type": "operator"})
    account_jwt = _jwt(
        operator,
        account.public_key.decode(),
        {
            "type": "account",
            "limits": {**unlimited, "imports": -1, "exports": -1, "wildcards": True, "conn": -1},
        },
    )
    user_jwt = _jwt(account, user.public_key.decode(), {"type": "user", **unlimited})
    creds = tmp_path / "user.creds"
    creds.write_text(
        f"-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n"
        f"-----BEGIN USER NKEY SEED-----\n{user.seed.decode()}\n------END USER NKEY SEED------\n"
    )
    proc, port = _start_server(
        tmp_path,
        f"""
operator: "{operator_jwt}"
resolver: MEMORY
resolver_preload: {{ {account.public_key.decode()}: "{account_jwt}" }}
""",
    )
    stop_on_exit.append(proc)
    await _round_trip(CommonSettings(nats_url=f"nats://127.0.0.1:{port}", nats_creds_file=creds))


async def test_a_missing_credentials_file_is_named() -> None:
    settings = CommonSettings(nats_creds_file=Path("/nonexistent/shoal.creds"))
    with pytest.raises(Unavailable, match="SHOAL_NATS_CREDS_FILE=/nonexistent/shoal.creds"):
        await connect_nats(settings, name="auth-test")


def test_incoherent_nats_auth_settings_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="not both"):
        CommonSettings(nats_creds_file=tmp_path / "a", nats_nkey_seed_file=tmp_path / "b")
    with pytest.raises(ValidationError, match="go together"):
        CommonSettings(nats_tls_cert_file=tmp_path / "cert.pem")
