"""The broker login the fleet-side commands share (collect, rollout, simulate, top).

One place declares the flags and one reads them, so every command spells them alike and
reads the password file the same way (a clear one-line error when it cannot be read).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from edgefleet.cli.args import read_secret


@dataclass(frozen=True)
class Login:
    """Who a command connects to the broker as; cert/key only where a command takes them."""

    username: str | None
    password: str | None
    ca: Path | None
    cert: Path | None = None
    key: Path | None = None


def add_login_arguments(
    parser: argparse.ArgumentParser, *, who: str = "the", client_cert: bool = False
) -> None:
    """``--username``, ``--password-file`` and ``--ca``; ``--cert``/``--key`` for mTLS."""
    group = parser.add_argument_group("broker login")
    group.add_argument("--username", help=f"{who} broker user")
    group.add_argument("--password-file", help=f"file holding {who} password")
    group.add_argument("--ca", type=Path, help="CA bundle for mqtts://")
    if client_cert:
        group.add_argument("--cert", type=Path, help="client certificate (mTLS)")
        group.add_argument("--key", type=Path, help="the client certificate's private key")


def login_from(args: argparse.Namespace) -> Login:
    """The login ``add_login_arguments`` declared, with the password file read."""
    return Login(
        username=args.username,
        password=read_secret(args.password_file),
        ca=args.ca,
        cert=getattr(args, "cert", None),
        key=getattr(args, "key", None),
    )
