"""The accepted bearer tokens: from the settings and a tokens file that can be edited live.

Tokens are kept only as SHA-256 digests: comparing digests with `hmac.compare_digest`
takes the same time whatever the presented token is (its length included), and a
memory dump or a stray repr shows no token. Error messages name files and line
numbers, never a token's text.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydantic import SecretStr

log = logging.getLogger(__name__)

# RFC 6750 b64token: what may follow "Bearer " in an Authorization header.
B64TOKEN = re.compile(r"^[A-Za-z0-9\-._~+/]+=*$")
# Shorter than this is guessable; `openssl rand -hex 32` gives 64 characters.
MIN_TOKEN_LENGTH = 16
# A token file is a handful of lines; anything bigger is not one.
MAX_FILE_BYTES = 1 << 20
# A live edit is noticed within this long (one stat() per interval, not per request).
RECHECK_S = 1.0


class TokenError(ValueError):
    """A tokens file or setting that cannot be used; the message is safe to print."""


def digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", errors="surrogateescape")).digest()


def check_token(token: str, where: str) -> str:
    """`token` if usable as a bearer token, else TokenError naming `where` (not the token)."""
    if len(token) < MIN_TOKEN_LENGTH:
        raise TokenError(f"{where}: token shorter than {MIN_TOKEN_LENGTH} characters")
    if not B64TOKEN.match(token):
        raise TokenError(
            f"{where}: token has characters a bearer token cannot carry "
            "(allowed: letters, digits, - . _ ~ + / and trailing =)"
        )
    return token


def parse_tokens_file(text: str, name: str = "tokens file") -> list[str]:
    """Tokens of a tokens file: one per line; blank lines and '#' comments (whole-line or
    after whitespace) ignored; surrounding whitespace stripped."""
    tokens = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = re.split(r"(?:^|\s)#", raw, maxsplit=1)[0].strip()
        if not line:
            continue
        if any(c.isspace() for c in line):
            raise TokenError(f"{name}, line {number}: more than one word (one token per line)")
        tokens.append(check_token(line, f"{name}, line {number}"))
    return tokens


def _unreadable(path: Path, exc: OSError) -> TokenError:
    return TokenError(f"tokens file {path}: cannot read it ({exc.strerror or type(exc).__name__})")


def read_tokens_file(path: Path) -> list[str]:
    """The tokens in `path`; TokenError if it is missing, unreadable, too big or malformed."""
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise TokenError(f"tokens file {path}: {size} bytes, not a tokens file")
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise TokenError(f"tokens file {path}: not UTF-8 text") from None
    except OSError as exc:
        raise _unreadable(path, exc) from None
    return parse_tokens_file(text, f"tokens file {path}")


def matches(presented: str, accepted: Iterable[bytes]) -> bool:
    """Whether `presented` is one of the `accepted` digests, in time independent of which
    (every digest is compared, no early exit)."""
    wanted = digest(presented)
    found = False
    for candidate in accepted:
        found |= hmac.compare_digest(wanted, candidate)
    return found


@dataclass(frozen=True)
class _FileState:
    stamp: tuple[int, int, int]  # mtime_ns, size, inode: any edit or replacement changes it
    digests: tuple[bytes, ...]


class TokenStore:
    """The accepted tokens: the settings' list plus the tokens file, re-read when it changes.

    `load()` at start-up raises TokenError for a bad file; later a bad edit (or a file
    removed mid-rotation) keeps the last good tokens and logs why, so a typo never turns
    into an outage or a crash in the middle of a request.
    """

    def __init__(self, tokens: Sequence[SecretStr], tokens_file: Path | None) -> None:
        self._fixed = tuple(
            digest(check_token(t.get_secret_value(), f"http.auth.tokens[{i}]")) for i, t in enumerate(tokens)
        )
        self._path = tokens_file
        self._file: _FileState | None = None
        self._checked_at = 0.0
        self._last_error = ""

    def load(self) -> int:
        """Read the file now (strict); the number of accepted tokens."""
        if self._path is not None:
            self._file = self._read(self._path)
        self._checked_at = time.monotonic()
        return len(self.digests())

    def digests(self) -> tuple[bytes, ...]:
        return self._fixed + (self._file.digests if self._file else ())

    def current(self) -> tuple[bytes, ...]:
        """The accepted digests, after picking up an edit of the file (at most every RECHECK_S)."""
        now = time.monotonic()
        if self._path is not None and now - self._checked_at >= RECHECK_S:
            self._checked_at = now
            self._refresh(self._path)
        return self.digests()

    @staticmethod
    def _stamp(path: Path) -> tuple[int, int, int]:
        st = os.stat(path)
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _read(self, path: Path) -> _FileState:
        try:
            stamp = self._stamp(path)
        except OSError as exc:
            raise _unreadable(path, exc) from None
        return _FileState(stamp, tuple(digest(t) for t in read_tokens_file(path)))

    def _refresh(self, path: Path) -> None:
        try:
            if self._file is not None and self._stamp(path) == self._file.stamp:
                return
            self._file = self._read(path)
        except (OSError, TokenError) as exc:
            message = str(exc) if isinstance(exc, TokenError) else f"tokens file {path}: {type(exc).__name__}"
            if message != self._last_error:  # once per distinct problem, not per request
                log.error("%s; keeping the previous tokens", message)
                self._last_error = message
            return
        if self._last_error:
            log.info("tokens file %s readable again", path)
        self._last_error = ""
        log.info("tokens file %s loaded: %d token(s)", path, len(self._file.digests))


def client_token(tokens: Sequence[SecretStr], tokens_file: Path | None) -> str | None:
    """A token for radtriage's own clients of the port (the demo): the first configured one."""
    if tokens:
        return tokens[0].get_secret_value()
    if tokens_file is not None:
        found = read_tokens_file(tokens_file)
        return found[0] if found else None
    return None
