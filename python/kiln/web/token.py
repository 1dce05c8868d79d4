"""The HTTP API's token: a file in the state folder, mode 0600, made on first use.

Write requests always need it (`Authorization: Bearer TOKEN`); reads need it too when the API
listens beyond loopback. `kiln token` prints it.
"""

from __future__ import annotations

import hmac
import os
import secrets
import stat
from pathlib import Path

from kiln.errors import KilnError

__all__ = ["TOKEN_FILE", "TokenError", "matches", "read_or_make"]

#: The token's file name in the state folder.
TOKEN_FILE = "http.token"  # noqa: S105 (a file name, not a secret)


class TokenError(KilnError):
    """The token file cannot be read or made, or others may read it."""


def read_or_make(state_dir: Path) -> str:
    """The token in `state_dir`, made (mode 0600, owner only) if there is none. A token file
    that others may read or write is refused rather than used."""
    path = state_dir / TOKEN_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    except OSError as e:
        raise TokenError(f"{path}: cannot make the HTTP token: {e.strerror or e}") from None
    else:
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32) + "\n")
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
        text = path.read_text().strip()
    except OSError as e:
        raise TokenError(f"{path}: cannot read the HTTP token: {e.strerror or e}") from None
    if mode & 0o077:
        raise TokenError(
            f"{path}: others may read the HTTP token (mode {mode:04o}); "
            f"run chmod 600 {path} or delete it to have a new one made"
        )
    if len(text) < 16:
        raise TokenError(f"{path}: the HTTP token is shorter than 16 characters; delete it")
    return text


def matches(given: str | None, token: str) -> bool:
    """Whether a request's token is the token (constant time)."""
    return given is not None and hmac.compare_digest(given.encode(), token.encode())
