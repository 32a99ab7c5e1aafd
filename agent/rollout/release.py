"""Model releases: the signed manifest, its canonical encoding, Ed25519 keys, chunking.

A manifest names a model release (name, monotonically rising version, validity window,
minimum agent version) and one or more variants (per delegate kind), each with its size,
sha256, chunk size and the sha256 of every chunk. It is signed with Ed25519 over a canonical
encoding (sorted keys, no whitespace, UTF-8) of everything except the signature itself.
Devices trust the public keys listed in their config, by key id.
"""

from __future__ import annotations

import base64
import hashlib
import time
from pathlib import Path
from typing import Any, TypeVar

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import ValidationError

from edgefleet.errors import UserError
from edgefleet.fsutil import atomic_write_bytes
from edgefleet.protocol import Decision, InputSpecRef, Manifest, VariantSpec, loads
from edgefleet.rollout import chunks
from edgefleet.rollout.chunks import layout_error

# A content-defined variant lists a chunk per 20 KB or so (lite4 float: about 2,600); the
# shipped broker takes messages up to 1 MiB.
MAX_MANIFEST_BYTES = 1_000_000
MAX_DECISION_BYTES = 64 * 1024
DEFAULT_CHUNK = 128 * 1024
PARTIAL = "model.partial"  # a download in progress: each chunk at index * chunk_size


class ReleaseError(Exception):
    """A manifest or model that must not be installed; the message is the reason reported."""


def generate_keys(out: Path, key_id: str, overwrite: bool = False) -> tuple[Path, Path]:
    """A new Ed25519 pair: ``KEY_ID.key`` (mode 0600) and ``KEY_ID.pub``; never replaces one
    silently, since devices that trust the old key would refuse every release signed anew."""
    private = out / f"{key_id}.key"
    public = out / f"{key_id}.pub"
    existing = [p for p in (private, public) if p.exists()]
    if existing and not overwrite:
        raise UserError(f"{existing[0]} exists; --force replaces it (devices trust the old key)")
    try:
        out.mkdir(parents=True, exist_ok=True)
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        atomic_write_bytes(private, pem, mode=0o600)
        atomic_write_bytes(
            public,
            key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            ),
        )
    except OSError as exc:
        raise UserError(f"cannot write keys to {out}: {exc.strerror}") from None
    return private, public


def load_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load signing key {path}: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise UserError(f"{path} is not an Ed25519 private key")
    return key


def load_public_key(text: str) -> Ed25519PublicKey:
    """A PEM public key, or the raw 32-byte key in base64."""
    try:
        if "BEGIN" in text:
            key = serialization.load_pem_public_key(text.encode())
        else:
            key = Ed25519PublicKey.from_public_bytes(base64.b64decode(text, validate=True))
    except ValueError as exc:
        raise UserError(f"invalid public key: {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise UserError("trusted keys must be Ed25519 public keys")
    return key


Signed = TypeVar("Signed", Manifest, Decision)


def sign(manifest: Signed, key: Ed25519PrivateKey) -> Signed:
    """A release manifest or an operator decision, signed."""
    signed = manifest.model_copy(update={"signature": ""})
    signature = key.sign(signed.canonical())
    return signed.model_copy(update={"signature": base64.b64encode(signature).decode()})


def parse_manifest(payload: bytes) -> Manifest:
    if len(payload) > MAX_MANIFEST_BYTES:
        raise ReleaseError(f"manifest of {len(payload)} bytes exceeds {MAX_MANIFEST_BYTES}")
    try:
        data = loads(payload)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ReleaseError(f"manifest is not JSON: {exc}") from None
    try:
        manifest = Manifest.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"]) or "manifest"
        raise ReleaseError(f"malformed manifest: {loc}: {first['msg']}") from None
    manifest.received(payload)
    return manifest


def parse_decision(payload: bytes) -> Decision:
    """An operator's decision on a shadow phase; ReleaseError when it is not one."""
    if len(payload) > MAX_DECISION_BYTES:
        raise ReleaseError(f"decision of {len(payload)} bytes exceeds {MAX_DECISION_BYTES}")
    try:
        decision = Decision.model_validate(loads(payload))
    except (UnicodeDecodeError, ValueError) as exc:  # ValidationError is a ValueError
        raise ReleaseError(f"malformed decision: {str(exc).splitlines()[0]}") from None
    decision.received(payload)
    return decision


def verify_signature(manifest: Manifest | Decision, trusted: dict[str, Ed25519PublicKey]) -> None:
    if not manifest.signature:
        raise ReleaseError("manifest is not signed")
    key = trusted.get(manifest.key_id)
    if key is None:
        raise ReleaseError(f"signed by unknown key {manifest.key_id!r}")
    try:
        signature = base64.b64decode(manifest.signature, validate=True)
    except ValueError:
        raise ReleaseError("bad signature") from None
    for signed in manifest.signed_forms():
        try:
            key.verify(signature, signed)
        except InvalidSignature:
            continue
        return
    raise ReleaseError("bad signature")


def check_manifest(
    manifest: Manifest,
    trusted: dict[str, Ed25519PublicKey],
    active_version: int,
    max_bytes: int,
    kinds: list[str],
    agent_version: str,
    now: float | None = None,
) -> VariantSpec:
    """Every check made before a single chunk is downloaded; returns the variant to fetch."""
    verify_signature(manifest, trusted)
    now = time.time() if now is None else now
    if manifest.expires <= now:
        raise ReleaseError("manifest expired")
    if manifest.version <= active_version and not manifest.rollback:
        raise ReleaseError(
            f"version {manifest.version} is not newer than the active {active_version}"
        )
    if _version_tuple(agent_version) < _version_tuple(manifest.min_agent_version):
        raise ReleaseError(f"needs agent {manifest.min_agent_version}, this is {agent_version}")
    variant = manifest.variant_for(kinds)
    if variant is None:
        have = ", ".join(v.kind for v in manifest.variants)
        raise ReleaseError(f"no variant for this device's delegates {kinds} (release has {have})")
    if variant.size > max_bytes:
        raise ReleaseError(f"model of {variant.size} bytes exceeds the cap of {max_bytes}")
    wrong = layout_error(variant)
    if wrong is not None:
        raise ReleaseError(wrong)
    return variant


def _version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for part in text.split("."):
        digits = "".join(ch for ch in part if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def chunk(data: bytes, size: int = DEFAULT_CHUNK) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def describe_variant(
    kind: str,
    data: bytes,
    input_spec: dict[str, Any],
    chunk_size: int,
    labels: int | None = None,
    expected_top1: str | None = None,
    latency_budget_ms: float | None = None,
    content_defined: bool = False,
) -> VariantSpec:
    """A variant of ``data`` in ``chunk_size`` chunks (what the first agents expect), or,
    ``content_defined``, in content-defined chunks fetched by hash and shared by releases."""
    cdc = None
    if content_defined:
        cdc, hashes = chunks.content_defined(data)
        chunk_size = max(cdc.lengths)
    else:
        hashes = [hashlib.sha256(c).hexdigest() for c in chunk(data, chunk_size)]
    return VariantSpec(
        kind=kind,
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        chunk_size=chunk_size,
        chunks=hashes,
        cdc=cdc,
        input=InputSpecRef.model_validate(input_spec),
        labels=labels,
        expected_top1=expected_top1,
        latency_budget_ms=latency_budget_ms,
    )


def pieces(variant: VariantSpec, data: bytes) -> list[tuple[str, bytes]]:
    """``data`` cut as ``variant`` says, each piece with its sha256."""
    view = memoryview(data)
    return [
        (span.sha256, bytes(view[span.offset : span.offset + span.length]))
        for span in chunks.spans(variant)
    ]
