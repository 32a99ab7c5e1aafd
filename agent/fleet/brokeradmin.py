"""``edgefleet broker add-device``: give a device its broker identity and its group rights.

Two ways to prove identity, matching ``configs/mosquitto/``:
- a password entry (``mosquitto_passwd``) for the password-file broker;
- a client certificate signed by the fleet CA (its CN is the device id) for the mTLS broker.
Either way the device's groups are appended to the ACL as a ``user`` block, because a
mosquitto ACL pattern cannot know which groups a device belongs to.
"""

from __future__ import annotations

import datetime as dt
import re
import secrets
import shutil
import subprocess
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edgefleet.errors import UserError
from edgefleet.fsutil import atomic_write_bytes
from edgefleet.protocol import FleetTopics

ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
RESERVED = {"operator", "collector"}


def check_id(name: str, what: str) -> None:
    if not ID_PATTERN.match(name):
        raise UserError(f"invalid {what} {name!r}: letters, digits, '_', '.', '-' (max 64)")


def add_groups_to_acl(acl: Path, device: str, groups: list[str], prefix: str) -> None:
    for group in groups:
        check_id(group, "group name")
    text = acl.read_text(encoding="utf-8") if acl.exists() else ""
    if re.search(rf"^user {re.escape(device)}$", text, re.MULTILINE):
        raise UserError(f"{acl}: device {device!r} already has a user block")
    block = [f"user {device}"]
    topics = FleetTopics(prefix)
    for group in groups:
        block.append(f"topic read {topics.group_command_filter(group)}")
        block.append(f"topic read {topics.desired(f'group:{group}')}")
    if not text.endswith("\n") and text:
        text += "\n"
    atomic_write_bytes(acl, (text + "\n".join(block) + "\n").encode())


def add_password(passwd: Path, device: str, password: str) -> None:
    tool = shutil.which("mosquitto_passwd")
    if tool is None:
        raise UserError("mosquitto_passwd not found (apt install mosquitto)")
    if not passwd.exists():
        passwd.touch(mode=0o600)
    proc = subprocess.run(
        [tool, "-b", str(passwd), device, password],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if proc.returncode != 0:
        raise UserError(f"mosquitto_passwd failed: {proc.stderr.strip() or proc.stdout.strip()}")


def issue_certificate(
    ca_cert: Path, ca_key: Path, device: str, out: Path, days: int = 825
) -> tuple[Path, Path]:
    try:
        ca = x509.load_pem_x509_certificate(ca_cert.read_bytes())
        key = serialization.load_pem_private_key(ca_key.read_bytes(), password=None)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load the fleet CA: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise UserError("the fleet CA key must be an EC or RSA key")
    device_key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device)]))
        .issuer_name(ca.subject)
        .public_key(device_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    out.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = out / f"{device}.crt", out / f"{device}.key"
    atomic_write_bytes(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    atomic_write_bytes(
        key_path,
        device_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
    key_path.chmod(0o600)
    return cert_path, key_path


def add_device(
    device: str,
    acl: Path,
    groups: list[str],
    prefix: str = "edgefleet/v1",
    passwd: Path | None = None,
    password: str | None = None,
    ca_cert: Path | None = None,
    ca_key: Path | None = None,
    out: Path | None = None,
) -> dict[str, str]:
    """Create the device's identity and ACL entry; returns what was written where."""
    check_id(device, "device id")
    if device in RESERVED:
        raise UserError(f"{device!r} is a reserved role name")
    if (passwd is None) == (ca_cert is None):
        raise UserError("give either --passwd (password file) or --ca-cert/--ca-key (mTLS)")
    written: dict[str, str] = {}
    if passwd is not None:
        secret = password or secrets.token_urlsafe(24)
        add_password(passwd, device, secret)
        written["passwd"] = str(passwd)
        if password is None:
            written["password"] = secret
    elif ca_cert is not None:
        if ca_key is None or out is None:
            raise UserError("mTLS needs --ca-key and --out as well")
        cert, key = issue_certificate(ca_cert, ca_key, device, out)
        written.update(cert=str(cert), key=str(key))
    add_groups_to_acl(acl, device, groups, prefix)
    written["acl"] = str(acl)
    return written
