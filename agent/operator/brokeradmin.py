"""``edgefleet broker``: enrol and remove devices, operators and collectors.

The shipped broker (``configs/mosquitto/``) has two listeners with their own identities;
mosquitto's client ids are global across listeners, so on both the broker makes each
client's id its user name (``use_username_as_clientid``) and the names are kept apart:
- devices (port 8883): a password entry (``mosquitto_passwd``) or a client certificate signed
  by the fleet CA (its CN is the device id); no device can take over another's session and
  fire its last will. The device's groups are appended to the devices' ACL as a ``user``
  block, because a mosquitto ACL pattern cannot know which groups a device belongs to.
- fleet services (port 8884): operators, named ``op-*``, and collectors, named
  ``collector-*``, each with its own name and password in the services' password file and a
  ``user`` block of its role's rights in the services' ACL; several collectors share the
  load, each its own identity. A device may not be named ``op-*`` or ``collector-*``.
Removal deletes the password entry and the ACL block, or revokes the certificate in the CRL.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
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

CaKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
RESERVED = {"operator", "collector"}
# Each role's names (and so, forced by the broker, client ids) start with its own prefix.
ROLE_PREFIX = {"operator": "op-", "collector": "collector-"}


def check_id(name: str, what: str) -> None:
    if not ID_PATTERN.match(name):
        raise UserError(f"invalid {what} {name!r}: letters, digits, '_', '.', '-' (max 64)")


def add_groups_to_acl(acl: Path, device: str, groups: list[str], prefix: str) -> None:
    for group in groups:
        check_id(group, "group name")
    topics = FleetTopics(prefix)
    lines = []
    for group in groups:
        lines.append(f"topic read {topics.group_command_filter(group)}")
        lines.append(f"topic read {topics.desired(f'group:{group}')}")
        lines.append(f"topic read {topics.decision(f'group:{group}')}")
    _append_block(acl, device, lines)


ROLES = ("operator", "collector")


def role_rights(role: str, prefix: str) -> list[str]:
    """The ACL lines of a fleet-service role (the topics each role reads and writes)."""
    topics = FleetTopics(prefix)
    if role == "operator":
        return [
            f"topic write {topics.every_device('cmd/#')}",
            f"topic write {topics.every_group('cmd/#')}",
            # readwrite: `rollout status` and `rollout clear` read desired states
            f"topic readwrite {topics.every_device('model/desired')}",
            f"topic readwrite {topics.every_group('model/desired')}",
            f"topic readwrite {topics.every_device('model/decision')}",
            f"topic readwrite {topics.every_group('model/decision')}",
            f"topic readwrite {prefix}/models/#",
            f"topic read {prefix}/devices/#",
        ]
    if role == "collector":
        # rollout and model/desired: read only, for the dashboard's rollout and desired columns
        leaves = (
            "status",
            "predictions",
            "metrics",
            "events",
            "samples",
            "rollout",
            "model/desired",
        )
        return [
            *(f"topic read {topics.every_device(leaf)}" for leaf in leaves),
            f"topic read {topics.every_group('model/desired')}",
            f"topic write {topics.every_device('ack')}",
        ]
    raise UserError(f"unknown role {role!r} (roles: {', '.join(ROLES)})")


def _append_block(acl: Path, user: str, lines: list[str]) -> None:
    text = acl.read_text(encoding="utf-8") if acl.exists() else ""
    if re.search(rf"^user {re.escape(user)}$", text, re.MULTILINE):
        raise UserError(f"{acl}: {user!r} already has a user block")
    if text and not text.endswith("\n"):
        text += "\n"
    atomic_write_bytes(acl, (text + "\n".join([f"user {user}", *lines]) + "\n").encode())


def remove_block(acl: Path, user: str) -> bool:
    """Drop ``user``'s block from an ACL file; False when it had none."""
    if not acl.exists():
        return False
    out, skipping, found = [], False, False
    for line in acl.read_text(encoding="utf-8").splitlines():
        if line.startswith("user "):
            skipping = line == f"user {user}"
            found = found or skipping
        elif skipping and not line.startswith("topic ") and not line.startswith("pattern "):
            skipping = False
        if not skipping:
            out.append(line)
    if found:
        atomic_write_bytes(acl, ("\n".join(out) + "\n").encode())
    return found


def add_service(
    name: str, role: str, acl: Path, passwd: Path, prefix: str, password: str | None = None
) -> dict[str, str]:
    """An operator's or collector's identity on the fleet-services listener."""
    check_id(name, f"{role} name")
    wanted = ROLE_PREFIX.get(role, "")
    if not name.startswith(wanted):
        raise UserError(
            f"{role} name {name!r} must start with {wanted!r}: the broker makes a service's "
            f"name its client id, which must never be a device's (e.g. {wanted}{name})"
        )
    rights = role_rights(role, prefix)
    secret = password or secrets.token_urlsafe(24)
    add_password(passwd, name, secret)
    try:
        _append_block(acl, name, rights)
    except UserError:
        remove_password(passwd, name)
        raise
    written = {"passwd": str(passwd), "acl": str(acl)}
    if password is None:
        written["password"] = secret
    return written


def remove_password(passwd: Path, user: str) -> bool:
    """Delete ``user`` from a mosquitto password file; False when it was not there."""
    if not passwd.exists():
        return False
    lines = passwd.read_text(encoding="utf-8").splitlines()
    kept = [line for line in lines if line.split(":", 1)[0] != user]
    if len(kept) == len(lines):
        return False
    atomic_write_bytes(passwd, ("\n".join(kept) + "\n").encode() if kept else b"", mode=0o600)
    return True


def _load_ca(
    ca_cert: Path, ca_key: Path
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey]:
    try:
        ca = x509.load_pem_x509_certificate(ca_cert.read_bytes())
        key = serialization.load_pem_private_key(ca_key.read_bytes(), password=None)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load the fleet CA: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise UserError("the fleet CA key must be an EC or RSA key")
    return ca, key


def revoke(ca_cert: Path, ca_key: Path, crl: Path, cert: Path | None = None) -> int:
    """Write ``crl`` signed by the fleet CA, adding ``cert``'s serial; returns the count.

    Without ``cert`` it only (re)issues the list: the broker needs one to start with
    ``crlfile`` set.
    """
    ca, key = _load_ca(ca_cert, ca_key)
    revoked: list[x509.RevokedCertificate] = []
    if crl.exists():
        try:
            revoked = list(x509.load_pem_x509_crl(crl.read_bytes()))
        except ValueError as exc:
            raise UserError(f"{crl}: not a CRL: {exc}") from None
    now = dt.datetime.now(dt.timezone.utc)
    if cert is not None:
        try:
            serial = x509.load_pem_x509_certificate(cert.read_bytes()).serial_number
        except (OSError, ValueError) as exc:
            raise UserError(f"cannot read certificate {cert}: {exc}") from None
        if all(r.serial_number != serial for r in revoked):
            revoked.append(
                x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now).build()
            )
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.subject)
        .last_update(now)
        .next_update(now + dt.timedelta(days=365))
    )
    for entry in revoked:
        builder = builder.add_revoked_certificate(entry)
    atomic_write_bytes(
        crl, builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)
    )
    return len(revoked)


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


def _certificate(
    issuer: tuple[x509.Certificate, CaKey] | None,
    cn: str,
    days: int,
    *extensions: tuple[x509.ExtensionType, bool],
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A new P-256 key and its certificate, signed by ``issuer`` (or by itself when None)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = dt.datetime.now(dt.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer[0].subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
    )
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    return builder.sign(issuer[1] if issuer else key, hashes.SHA256()), key


def _write_pair(
    out: Path, stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey
) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = out / f"{stem}.crt", out / f"{stem}.key"
    atomic_write_bytes(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    atomic_write_bytes(key_path, pem, mode=0o600)
    return cert_path, key_path


def issue_certificate(
    ca_cert: Path, ca_key: Path, device: str, out: Path, days: int = 825
) -> tuple[Path, Path]:
    """A device's client certificate (CN = device id), signed by the fleet CA."""
    usage = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH])
    cert, key = _certificate(_load_ca(ca_cert, ca_key), device, days, (usage, False))
    return _write_pair(out, device, cert, key)


def init_broker(out: Path, server_names: list[str], days: int = 825) -> dict[str, str]:
    """A new fleet: its CA, the broker's server certificate, empty password files and CRL.

    Nothing existing is replaced: a second CA would orphan every enrolled device.
    """
    names = ["fleet-ca.crt", "fleet-ca.key", "server.crt", "server.key", "passwd"]
    names += ["passwd-fleet", "crl.pem"]
    taken = [n for n in names if (out / n).exists()]
    if taken:
        raise UserError(f"{out / taken[0]} exists; broker init never replaces a fleet's keys")
    ca_ext = (x509.BasicConstraints(ca=True, path_length=0), True)
    signing = x509.KeyUsage(
        digital_signature=True, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
        encipher_only=False, decipher_only=False,
    )  # fmt: skip
    ca, ca_key = _certificate(None, "edgefleet fleet CA", 3650, ca_ext, (signing, True))
    ca_paths = _write_pair(out, "fleet-ca", ca, ca_key)
    alt: list[x509.GeneralName] = []
    for name in server_names:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            alt.append(x509.DNSName(name))
    server, server_key = _certificate(
        (ca, ca_key),
        server_names[0],
        days,
        (x509.SubjectAlternativeName(alt), False),
        (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False),
    )
    _write_pair(out, "server", server, server_key)
    for passwd in ("passwd", "passwd-fleet"):
        atomic_write_bytes(out / passwd, b"", mode=0o600)
    revoke(*ca_paths, out / "crl.pem")
    return {"ca": str(ca_paths[0]), "ca key": f"{ca_paths[1]} (keep it off the broker)"} | {
        "server": str(out / "server.crt"),
        "password files": f"{out / 'passwd'}, {out / 'passwd-fleet'}",
        "crl": str(out / "crl.pem"),
    }


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
    for reserved in ROLE_PREFIX.values():
        if device.startswith(reserved):
            raise UserError(
                f"device id {device!r} starts with {reserved!r}, which is the services' (a "
                "device with it could share a client id with one of them)"
            )
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


def remove_device(
    device: str,
    acl: Path,
    passwd: Path | None = None,
    crl: Path | None = None,
    cert: Path | None = None,
    ca_cert: Path | None = None,
    ca_key: Path | None = None,
) -> dict[str, str]:
    """Take a device's identity away: its password entry, or its certificate via the CRL.

    Its ACL block goes too. The broker applies it on reload (``systemctl reload mosquitto``,
    i.e. SIGHUP); a connection the device holds is closed then.
    """
    check_id(device, "device id")
    done: dict[str, str] = {}
    if passwd is not None:
        if not remove_password(passwd, device):
            raise UserError(f"{passwd}: no entry for {device!r}")
        done["passwd"] = f"{device} removed"
    elif crl is not None:
        if cert is None or ca_cert is None or ca_key is None:
            raise UserError("revoking needs --cert (the device's), --ca-cert and --ca-key")
        done["crl"] = f"{revoke(ca_cert, ca_key, crl, cert)} revoked in {crl}"
    else:
        raise UserError("give either --passwd (password file) or --crl (mTLS)")
    done["acl"] = "block removed" if remove_block(acl, device) else "no block"
    return done
