"""Release manifests: canonical form, signature, every check at and beside its limit."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edgefleet.protocol import Manifest
from edgefleet.rollout.release import (
    ReleaseError,
    check_manifest,
    describe_variant,
    generate_keys,
    load_private_key,
    load_public_key,
    parse_manifest,
    sign,
)

SPEC = {"height": 224, "width": 224, "dtype": "uint8"}


def _manifest(keys: tuple[Path, Path], **changes: object) -> Manifest:
    data = b"TFL3" * 100
    now = time.time()
    fields: dict[str, object] = {
        "rollout_id": "r1",
        "name": "lite0",
        "version": 2,
        "created": now,
        "expires": now + 3600,
        "key_id": "release",
        "variants": [describe_variant("cpu", data, SPEC, 128)],
    }
    fields.update(changes)
    return sign(Manifest.model_validate(fields), load_private_key(keys[0]))


def _trusted(keys: tuple[Path, Path]) -> dict[str, Ed25519PublicKey]:
    return {"release": load_public_key(keys[1].read_text())}


def _check(
    manifest: Manifest,
    keys: tuple[Path, Path],
    active: int = 1,
    kinds: tuple[str, ...] = ("cpu",),
    cap: int = 10**8,
) -> None:
    check_manifest(manifest, _trusted(keys), active, cap, list(kinds), "0.1.0")


def test_good_manifest_passes(keys: tuple[Path, Path]) -> None:
    manifest = _manifest(keys)
    _check(manifest, keys)
    again = parse_manifest(manifest.model_dump_json().encode())
    assert again.canonical() == manifest.canonical()


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ("unsigned", "manifest is not signed"),
        ("tampered", "bad signature"),
        ("unknown_key", "signed by unknown key 'other'"),
        ("expired", "manifest expired"),
        ("older", "version 1 is not newer than the active 1"),
        ("oversize", "exceeds the cap of 100"),
        ("edgetpu_only", "no variant for this device's delegates ['cpu'] (release has edgetpu)"),
        ("newer_agent", "needs agent 9.0.0"),
    ],
)
def test_manifest_attacks_are_refused(keys: tuple[Path, Path], change: str, reason: str) -> None:
    manifest = _manifest(keys)
    cap = 10**8
    if change == "unsigned":
        manifest = manifest.model_copy(update={"signature": ""})
    elif change == "tampered":
        manifest = manifest.model_copy(update={"version": 99})
    elif change == "unknown_key":
        manifest = _manifest(keys, key_id="other")
    elif change == "expired":
        manifest = _manifest(keys, expires=time.time() - 1)
    elif change == "older":
        manifest = _manifest(keys, version=1)
    elif change == "oversize":
        cap = 100
    elif change == "edgetpu_only":
        variant = describe_variant("edgetpu", b"TFL3" * 10, SPEC, 128)
        manifest = _manifest(keys, variants=[variant])
    elif change == "newer_agent":
        manifest = _manifest(keys, min_agent_version="9.0.0")
    with pytest.raises(ReleaseError) as info:
        _check(manifest, keys, cap=cap)
    assert reason in str(info.value)


def test_explicit_rollback_may_go_back(keys: tuple[Path, Path]) -> None:
    _check(_manifest(keys, version=1, rollback=True), keys, active=3)


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"{not json", "manifest is not JSON"),
        (b'{"name": "x"}', "malformed manifest"),
        (b"x" * 1_000_001, "exceeds 1000000"),
    ],
)
def test_malformed_manifests(payload: bytes, reason: str) -> None:
    with pytest.raises(ReleaseError, match=reason):
        parse_manifest(payload)


# -- each limit on both of its sides; the encoding and signature pinned -----------------------
GOLDEN_KEY = bytes(range(32))
GOLDEN_CANONICAL_SHA256 = "66b448d9d3047c7a5a15a52e7693f5b61818464819f787587ac098c9753a5c6d"
GOLDEN_SIGNATURE = (
    "/ogdFRxmuKtcLrdVEM/Rc9TtLnU3uWCic7FwIZfThF2WDyYuh/5UOGo6gjWt7ZYzz3abpIcpTrxt+liX5amrDg=="
)


def _golden() -> Manifest:
    from edgefleet.protocol import InputSpecRef, VariantSpec

    variant = VariantSpec(
        kind="cpu",
        size=400,
        sha256="a" * 64,
        chunk_size=128,
        chunks=["b" * 64] * 4,
        input=InputSpecRef(height=224, width=224, dtype="uint8"),
        labels=1000,
        expected_top1="café",  # UTF-8 in the signed bytes, not \u escapes
    )
    return Manifest(
        rollout_id="r1",
        name="lite0",
        version=2,
        created=1795908000.0,
        expires=1796512800.0,
        key_id="release",
        variants=[variant],
    )


def test_canonical_encoding_and_signature_are_pinned() -> None:
    """A change to the encoding would break every signature already out there: noticed."""
    import hashlib

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    manifest = _golden()
    canonical = manifest.canonical()
    assert canonical.startswith(b'{"created":1795908000.0,"expires":1796512800.0,"key_id"')
    assert '"expected_top1":"café"'.encode() in canonical
    assert hashlib.sha256(canonical).hexdigest() == GOLDEN_CANONICAL_SHA256
    key = Ed25519PrivateKey.from_private_bytes(GOLDEN_KEY)
    signed = sign(manifest, key)
    assert signed.signature == GOLDEN_SIGNATURE
    from edgefleet.rollout.release import verify_signature

    verify_signature(signed, {"release": key.public_key()})  # and it verifies


def test_the_check_returns_the_variant_to_fetch(keys: tuple[Path, Path]) -> None:
    cpu = describe_variant("cpu", b"TFL3" * 100, SPEC, 128)
    tpu = describe_variant("edgetpu", b"TFL4" * 100, SPEC, 128)
    manifest = _manifest(keys, variants=[tpu, cpu])
    variant = check_manifest(
        manifest,
        _trusted(keys),
        1,
        10**8,
        ["edgetpu", "cpu"],
        "0.1.0",
    )
    assert variant == tpu
    variant = check_manifest(manifest, _trusted(keys), 1, 10**8, ["cpu"], "0.1.0")
    assert variant == cpu
    anything = describe_variant("any", b"TFL5" * 100, SPEC, 128)
    variant = check_manifest(
        _manifest(keys, variants=[anything]),
        _trusted(keys),
        1,
        10**8,
        ["gpu"],
        "0.1.0",
    )
    assert variant == anything


def test_limits_on_both_sides(keys: tuple[Path, Path]) -> None:
    manifest = _manifest(keys)  # a 400-byte variant
    _check(manifest, keys, cap=400)  # exactly at the cap: allowed
    with pytest.raises(ReleaseError, match="exceeds the cap of 399"):
        _check(manifest, keys, cap=399)
    _check(_manifest(keys, version=2), keys, active=1)
    with pytest.raises(ReleaseError, match="version 2 is not newer than the active 2"):
        _check(_manifest(keys, version=2), keys, active=2)
    _check(_manifest(keys, min_agent_version="0.1.0"), keys)  # the same version: allowed
    with pytest.raises(ReleaseError, match=r"needs agent 0\.1\.1"):
        _check(_manifest(keys, min_agent_version="0.1.1"), keys)


def test_expiry_at_its_instant(keys: tuple[Path, Path]) -> None:
    manifest = _manifest(keys, expires=1000.0)
    check_manifest(manifest, _trusted(keys), 1, 10**8, ["cpu"], "0.1.0", now=999.999)
    with pytest.raises(ReleaseError, match="manifest expired"):
        check_manifest(manifest, _trusted(keys), 1, 10**8, ["cpu"], "0.1.0", now=1000.0)


def test_chunk_count_must_fit_the_size(keys: tuple[Path, Path]) -> None:
    variant = describe_variant("cpu", b"TFL3" * 100, SPEC, 128)  # 400 bytes: 4 chunks
    short = variant.model_copy(update={"chunks": variant.chunks[:3]})
    with pytest.raises(ReleaseError, match="3 chunk hashes for 4 chunks"):
        _check(_manifest(keys, variants=[short]), keys)
    extra = variant.model_copy(update={"chunks": [*variant.chunks, variant.chunks[0]]})
    with pytest.raises(ReleaseError, match="5 chunk hashes for 4 chunks"):
        _check(_manifest(keys, variants=[extra]), keys)


def test_manifest_size_cap_on_both_sides() -> None:
    from edgefleet.rollout.release import MAX_MANIFEST_BYTES

    at_cap = b" " * (MAX_MANIFEST_BYTES - 2) + b"{}"
    with pytest.raises(ReleaseError, match="malformed manifest"):  # parsed, not refused by size
        parse_manifest(at_cap)
    with pytest.raises(ReleaseError, match=f"exceeds {MAX_MANIFEST_BYTES}"):
        parse_manifest(at_cap + b" ")


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("version", 0, "version: Input should be greater than or equal to 1"),
        ("variants", [], "variants: List should have at least 1 item"),
        ("key_id", "k" * 65, "key_id: String should have at most 64 characters"),
        ("key_id", "", "key_id: String should have at least 1 character"),
        ("colour", "red", "colour: Extra inputs are not permitted"),
    ],
)
def test_manifest_fields_are_bounded(
    keys: tuple[Path, Path], field: str, value: object, message: str
) -> None:
    import json

    body = json.loads(_manifest(keys).model_dump_json())
    body[field] = value
    with pytest.raises(ReleaseError, match=re.escape(message)):
        parse_manifest(json.dumps(body).encode())
    body = json.loads(_manifest(keys).model_dump_json())
    assert parse_manifest(json.dumps(body).encode()).key_id == "release"  # unchanged: fine


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("size", 0, "size: Input should be greater than 0"),
        ("chunk_size", 16 * 1024 * 1024 + 1, "chunk_size: Input should be less than or equal to"),
        ("chunks", [], "chunks: List should have at least 1 item"),
        ("kind", "Bad Kind", "kind: String should match pattern"),
        ("shiny", True, "shiny: Extra inputs are not permitted"),
    ],
)
def test_variant_fields_are_bounded(
    keys: tuple[Path, Path], field: str, value: object, message: str
) -> None:
    import json

    body = json.loads(_manifest(keys).model_dump_json())
    body["variants"][0][field] = value
    with pytest.raises(ReleaseError, match=re.escape(message)):
        parse_manifest(json.dumps(body).encode())
    body["variants"][0]["chunk_size"] = 16 * 1024 * 1024
    body["variants"][0].pop("shiny", None)
    if field not in ("chunk_size", "shiny"):
        return
    assert parse_manifest(json.dumps(body).encode()).variants[0].chunk_size == 16 * 1024 * 1024


def test_signature_and_key_decoding_are_strict(keys: tuple[Path, Path]) -> None:
    from edgefleet.errors import UserError

    manifest = _manifest(keys)
    loose = manifest.model_copy(update={"signature": manifest.signature + "!!"})
    with pytest.raises(ReleaseError, match="bad signature"):
        _check(loose, keys)
    with pytest.raises(UserError, match="invalid public key"):
        load_public_key("not base64 at all!")
    with pytest.raises(UserError, match="invalid public key"):
        load_public_key("AAAA")  # base64, but not 32 bytes


def test_chunks_cut_the_file_in_order() -> None:
    from edgefleet.rollout.release import DEFAULT_CHUNK, chunk

    assert chunk(b"abcdefgh", 3) == [b"abc", b"def", b"gh"]
    assert [len(c) for c in chunk(b"x" * 300_000)] == [131_072, 131_072, 37_856]
    assert DEFAULT_CHUNK == 128 * 1024  # the fixed size docs/protocol.md gives older agents
    import hashlib

    variant = describe_variant("cpu", b"abcdefgh", SPEC, 3)
    assert variant.chunks == [hashlib.sha256(c).hexdigest() for c in (b"abc", b"def", b"gh")]
    assert variant.size == 8


def test_agent_versions_compare_by_number(keys: tuple[Path, Path]) -> None:
    _check(_manifest(keys, min_agent_version="0.1.x"), keys)  # a part without digits is 0
    _check(_manifest(keys, min_agent_version="0.0.9"), keys)
    with pytest.raises(ReleaseError, match=r"needs agent 0\.10"):
        _check(_manifest(keys, min_agent_version="0.10"), keys)


def test_keys_are_generated_safely(tmp_path: Path) -> None:
    from edgefleet.errors import UserError

    out = tmp_path / "new" / "folder"
    private, public = generate_keys(out, "ops")
    assert private.stat().st_mode & 0o777 == 0o600
    assert public.stat().st_mode & 0o777 == 0o644
    first = private.read_bytes()
    with pytest.raises(UserError, match="exists; --force replaces it"):
        generate_keys(out, "ops")
    public.unlink()  # the public half alone missing still refuses: the private one exists
    with pytest.raises(UserError, match="exists"):
        generate_keys(out, "ops")
    generate_keys(out, "ops", overwrite=True)
    assert private.read_bytes() != first
    load_private_key(private)
    load_public_key(public.read_text())


def test_keys_of_the_wrong_kind_are_refused(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from edgefleet.errors import UserError

    other = ec.generate_private_key(ec.SECP256R1())
    pem = other.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    (tmp_path / "ec.key").write_bytes(pem)
    with pytest.raises(UserError, match="is not an Ed25519 private key"):
        load_private_key(tmp_path / "ec.key")
    with pytest.raises(UserError, match="cannot load signing key"):
        load_private_key(tmp_path / "missing.key")
    public = other.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    with pytest.raises(UserError, match="trusted keys must be Ed25519 public keys"):
        load_public_key(public.decode())


@pytest.mark.parametrize(
    ("where", "field", "low", "high"),
    [
        ("input", "height", 1, 4096),
        ("input", "width", 1, 4096),
        ("variant", "chunk_size", 1, 16 * 1024 * 1024),
        ("variant", "size", 1, None),
        ("variant", "labels", 1, None),
        ("variant", "latency_budget_ms", 0.001, None),
        ("manifest", "rollout_id", "r", "r" * 64),
        ("manifest", "version", 1, None),
    ],
)
def test_model_limits_on_both_sides(
    keys: tuple[Path, Path], where: str, field: str, low: object, high: object
) -> None:
    import json

    def parse_with(value: object) -> None:
        body = json.loads(_manifest(keys).model_dump_json())
        target = {"manifest": body, "variant": body["variants"][0]}.get(where)
        if target is None:
            target = body["variants"][0]["input"]
        target[field] = value
        parse_manifest(json.dumps(body).encode())

    parse_with(low)  # the edge itself is allowed
    below = "" if isinstance(low, str) else (0 if isinstance(low, int) else 0.0)
    with pytest.raises(ReleaseError):
        parse_with(below)
    if high is not None:
        parse_with(high)
        above = high + "r" if isinstance(high, str) else high + 1  # type: ignore[operator]
        with pytest.raises(ReleaseError):
            parse_with(above)


def test_the_last_release_survivors(keys: tuple[Path, Path], tmp_path: Path) -> None:
    """Strict base64, the first problem reported, versions without digits, unwritable keys."""
    import base64

    from edgefleet.errors import UserError

    raw = base64.b64encode(b"\x01" * 32).decode()
    load_public_key(raw)  # a raw 32-byte key in base64 is fine
    with pytest.raises(UserError, match="invalid public key"):
        load_public_key(raw[:20] + "!" + raw[20:])  # lenient decoding would accept it
    with pytest.raises(ReleaseError, match=r"malformed manifest: rollout_id: Field required"):
        parse_manifest(b'{"version": 0}')  # two problems: the first field's is reported
    manifest = _manifest(keys, min_agent_version="0.1.0")
    check_manifest(manifest, _trusted(keys), 1, 10**8, ["cpu"], "0.1.dev")  # dev counts as 0
    (tmp_path / "taken").write_text("a file where the folder should be")
    with pytest.raises(UserError, match="cannot write keys to"):
        generate_keys(tmp_path / "taken", "k")


def test_the_shadow_phase_is_signed_and_its_absence_changes_no_signature(
    keys: tuple[Path, Path],
) -> None:
    from edgefleet.protocol import ShadowSpec
    from edgefleet.rollout.release import verify_signature

    plain = _manifest(keys)
    assert b"shadow" not in plain.canonical()  # manifests signed before the key existed
    shadowed = _manifest(keys, shadow=ShadowSpec(samples=300, min_agreement=0.95))
    assert b'"shadow":{"interval_s":2.0' in shadowed.canonical()
    verify_signature(shadowed, _trusted(keys))
    # Loosening the rules after signing breaks the signature.
    loosened = shadowed.model_copy(update={"shadow": ShadowSpec(samples=300, min_agreement=0.5)})
    with pytest.raises(ReleaseError, match="bad signature"):
        verify_signature(loosened, _trusted(keys))
    dropped = shadowed.model_copy(update={"shadow": None})
    with pytest.raises(ReleaseError, match="bad signature"):
        verify_signature(dropped, _trusted(keys))


@pytest.mark.parametrize(
    ("rules", "field"),
    [({"samples": 0}, "samples"), ({"samples": 100_001}, "samples"),
     ({"samples": 1, "interval_s": 0.01}, "interval_s"),
     ({"samples": 1, "min_agreement": 1.5}, "min_agreement"),
     ({"samples": 1, "max_latency_ratio": 0}, "max_latency_ratio"),
     ({"samples": 1, "mode": "later"}, "mode"), ({"samples": 1, "extra": 1}, "extra")],
)  # fmt: skip
def test_shadow_rules_are_bounded(
    keys: tuple[Path, Path], rules: dict[str, Any], field: str
) -> None:
    signed = _manifest(keys).model_dump(mode="json")
    signed["shadow"] = rules
    with pytest.raises(ReleaseError, match=f"shadow.{field}"):
        parse_manifest(json.dumps(signed).encode())


def test_decisions_are_signed_like_releases(keys: tuple[Path, Path], tmp_path: Path) -> None:
    from edgefleet.protocol import Decision
    from edgefleet.rollout.release import parse_decision, verify_signature

    decision = sign(
        Decision(rollout_id="r1", action="promote", created=1.0, key_id="release"),
        load_private_key(keys[0]),
    )
    parsed = parse_decision(decision.model_dump_json().encode())
    verify_signature(parsed, _trusted(keys))
    assert parsed.action == "promote"
    flipped = parsed.model_copy(update={"action": "reject"})
    with pytest.raises(ReleaseError, match="bad signature"):
        verify_signature(flipped, _trusted(keys))
    other, _ = generate_keys(tmp_path, "other")
    foreign = sign(decision, load_private_key(other))
    with pytest.raises(ReleaseError, match="bad signature"):
        verify_signature(foreign, _trusted(keys))
    unknown = sign(decision.model_copy(update={"key_id": "other"}), load_private_key(other))
    with pytest.raises(ReleaseError, match="unknown key"):
        verify_signature(unknown, _trusted(keys))
    unsigned = decision.model_copy(update={"signature": ""})
    with pytest.raises(ReleaseError, match="not signed"):
        verify_signature(unsigned, _trusted(keys))
    for payload, reason in (
        (b"[]", "malformed decision"),
        (b"{nope", "malformed decision"),
        (b'{"rollout_id": "r1", "action": "maybe", "created": 1, "key_id": "k"}', "malformed"),
        (b" " * (64 * 1024 + 1), "exceeds"),
    ):
        with pytest.raises(ReleaseError, match=reason):
            parse_decision(payload)
    assert parse_decision(b" " * 10 + decision.model_dump_json().encode()).rollout_id == "r1"


@pytest.mark.parametrize(
    ("field", "inside", "outside"),
    [("samples", 1, 0), ("samples", 100_000, 100_001),
     ("interval_s", 0.05, 0.0499), ("interval_s", 3600, 3600.01),
     ("max_duration_s", 0.001, 0), ("min_agreement", 0, -0.001), ("min_agreement", 1, 1.001),
     ("max_latency_ratio", 0.001, 0), ("max_errors", 0, -1)],
)  # fmt: skip
def test_shadow_rules_at_their_limits(field: str, inside: float, outside: float) -> None:
    from pydantic import ValidationError

    from edgefleet.protocol import ShadowSpec

    base: dict[str, Any] = {"samples": 10}
    assert getattr(ShadowSpec.model_validate({**base, field: inside}), field) == inside
    with pytest.raises(ValidationError, match=field):
        ShadowSpec.model_validate({**base, field: outside})


@pytest.mark.parametrize("field", ["rollout_id", "key_id"])
def test_decision_ids_at_their_limits(field: str) -> None:
    from pydantic import ValidationError

    from edgefleet.protocol import Decision

    body: dict[str, Any] = {"rollout_id": "r", "action": "reject", "created": 1.0, "key_id": "k"}
    for good in ("x", "x" * 64):
        assert getattr(Decision.model_validate({**body, field: good}), field) == good
    for bad in ("", "x" * 65):
        with pytest.raises(ValidationError, match=field):
            Decision.model_validate({**body, field: bad})


def test_a_decision_of_exactly_the_size_cap_is_read() -> None:
    from edgefleet.protocol import Decision
    from edgefleet.rollout.release import MAX_DECISION_BYTES, parse_decision

    body = Decision(rollout_id="r", action="reject", created=1.0, key_id="k").model_dump_json()
    padded = body.encode().ljust(MAX_DECISION_BYTES, b" ")
    assert len(padded) == MAX_DECISION_BYTES
    assert parse_decision(padded).rollout_id == "r"


def test_shadow_defaults_are_the_documented_ones() -> None:
    from edgefleet.protocol import ShadowSpec

    spec = ShadowSpec(samples=300)
    assert (spec.interval_s, spec.max_duration_s, spec.mode) == (2.0, 3600.0, "auto")
    assert (spec.min_agreement, spec.max_latency_ratio, spec.max_errors) == (None, None, 0)


# -- a signer that is not ours ------------------------------------------------------------------


def _third_party_signed(fields: dict[str, Any], key_path: Path) -> bytes:
    """A release signer written from docs/protocol.md ("Signing") alone: canonical JSON of the
    fields it sends (keys sorted, no whitespace, numbers as it writes them), Ed25519, base64;
    then it sends the fields pretty-printed, in its own key order."""
    import base64

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    def canonical(value: Any) -> str:
        if isinstance(value, dict):
            return (
                "{"
                + ",".join(f"{json.dumps(k)}:{canonical(value[k])}" for k in sorted(value))
                + "}"
            )
        if isinstance(value, list):
            return "[" + ",".join(canonical(v) for v in value) + "]"
        return json.dumps(value, ensure_ascii=False)

    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    assert isinstance(key, Ed25519PrivateKey)
    signature = base64.b64encode(key.sign(canonical(fields).encode())).decode()
    sent = {"signature": signature, **dict(reversed(list(fields.items())))}
    return json.dumps(sent, indent=2, ensure_ascii=False).encode()


def _minimal_fields() -> dict[str, Any]:
    """A manifest with only what has no default, whole numbers as integers, a shadow phase
    without ``max_errors``, ``max_duration_s: 120`` (the agent's dump says ``120.0``)."""
    data = b"TFL3" * 100
    variant = describe_variant("cpu", data, SPEC, 128)
    now = int(time.time())
    return {
        "rollout_id": "third-party-é",
        "name": "lite0",
        "version": 3,
        "created": now,
        "expires": now + 3600,
        "key_id": "release",
        "shadow": {"samples": 5, "max_duration_s": 120},
        "variants": [
            {
                "kind": "cpu",
                "size": variant.size,
                "sha256": variant.sha256,
                "chunk_size": 128,
                "chunks": variant.chunks,
                "input": SPEC,
            }
        ],
    }


def test_a_manifest_signed_by_a_third_party_signer_from_the_docs_verifies(
    keys: tuple[Path, Path],
) -> None:
    payload = _third_party_signed(_minimal_fields(), keys[0])
    manifest = parse_manifest(payload)
    _check(manifest, keys)
    assert manifest.shadow is not None
    assert manifest.shadow.max_errors == 0
    # Over our own dump (every default filled in, 120.0) it would not have verified:
    with pytest.raises(ReleaseError, match="bad signature"):
        _check(Manifest.model_validate(json.loads(payload)), keys)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("version", 4),
        ("shadow", {"samples": 5, "max_duration_s": 121}),
        ("min_agent_version", "0.0.0"),
    ],
)
def test_a_third_party_manifest_changed_after_signing_is_refused(
    keys: tuple[Path, Path], field: str, value: object
) -> None:
    """Changing a field, or adding one that had its default (the same meaning), breaks it."""
    sent = json.loads(_third_party_signed(_minimal_fields(), keys[0]))
    sent[field] = value
    with pytest.raises(ReleaseError, match="bad signature"):
        _check(parse_manifest(json.dumps(sent).encode()), keys)


def test_a_copy_with_other_content_does_not_pass_for_what_was_sent(
    keys: tuple[Path, Path],
) -> None:
    manifest = parse_manifest(_third_party_signed(_minimal_fields(), keys[0]))
    with pytest.raises(ReleaseError, match="bad signature"):
        _check(manifest.model_copy(update={"version": 9}), keys)


def test_our_manifests_verify_as_published_and_as_any_json_library_sends_them(
    keys: tuple[Path, Path],
) -> None:
    manifest = _manifest(keys)
    for payload in (manifest.wire(), manifest.model_dump_json().encode()):
        _check(parse_manifest(payload), keys)
    assert b'"shadow"' not in manifest.wire()  # the keys added later stay out when unset
