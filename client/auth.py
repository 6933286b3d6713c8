"""The shared token of the client, the workers and the server: --token, --token-file or
$TENSORLAN_TOKEN (in that order)."""
from __future__ import annotations

import hmac
import os
from pathlib import Path

from client.errors import UserError

ENV = "TENSORLAN_TOKEN"


def resolve_token(token: str | None, token_file: Path | str | None) -> str | None:
    """The token given on the command line, else the first line of token_file, else $TENSORLAN_TOKEN;
    None when none is set."""
    if token:
        return token
    if token_file:
        try:
            text = Path(token_file).read_text().strip()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"--token-file {token_file}: cannot read it ({e})")
        if not text:
            raise UserError(f"--token-file {token_file}: the file is empty; put the token in it")
        return text.splitlines()[0].strip()
    return os.environ.get(ENV) or None


def token_ok(expected: str, given: str | None) -> bool:
    return given is not None and hmac.compare_digest(expected.encode(), given.encode())


def is_loopback(host: str) -> bool:
    import ipaddress
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
