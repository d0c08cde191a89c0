"""API keys: named, each with optional limits; fixed ones (`--api-key`, `$DSV32_API_KEY`) and those
of a key file, which SIGHUP reads again. Keys compare as UTF-8 bytes in constant time; no message
here ever quotes a key (only names and line numbers).

The key file: one key per line, `NAME: KEY [max_concurrent=N] [tpm=N]`; blank lines and lines whose
first non-blank character is `#` are ignored. NAME is letters, digits and `_ . @ -` (it is what
the access log prints); KEY is any run of printable characters without whitespace. The options
override `--max-concurrent-per-key` and `--tokens-per-minute-per-key` for that key.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import stat
from dataclasses import dataclass, field, replace
from pathlib import Path

log = logging.getLogger("dsv32.server")

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")
_OPTIONS = {"max_concurrent": "max_concurrent", "tpm": "tokens_per_minute"}


class KeyFileError(ValueError):
    """A key file that cannot be used (unreadable, malformed, or without keys)."""


@dataclass(frozen=True)
class Limits:
    """Per-key limits; None: no limit."""

    max_concurrent: int | None = None       # requests in flight (generation routes)
    tokens_per_minute: int | None = None    # prompt + completion tokens in the last 60 s

    def __post_init__(self) -> None:
        for name in ("max_concurrent", "tokens_per_minute"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer, not {value!r}")


@dataclass(frozen=True)
class ApiKey:
    """One accepted key: its name (logged), its bytes (never logged) and its limits."""

    name: str
    secret: bytes = field(repr=False)
    limits: Limits = Limits()


def check_api_key(key: str) -> None:
    """ValueError for a key no client can send: empty, padded with spaces, or with control characters."""
    if not isinstance(key, str) or not key.strip():
        raise ValueError("an API key must not be empty (leave the key out to serve without one)")
    if key != key.strip() or any(ord(c) < 32 or ord(c) == 127 for c in key):
        raise ValueError("an API key must not start or end with whitespace or hold control characters "
                         "(an HTTP header cannot carry them)")


def fixed_keys(keys: list[str], defaults: Limits) -> list[ApiKey]:
    """Keys given as strings (`--api-key`, then `$DSV32_API_KEY`), named api-key-1, api-key-2, ..."""
    for key in keys:
        check_api_key(key)
    return [ApiKey(f"api-key-{i}", key.encode("utf-8"), defaults) for i, key in enumerate(keys, 1)]


def parse_key_file(text: str, defaults: Limits, source: str = "key file") -> list[ApiKey]:
    """The keys of a key file's text; KeyFileError naming the line of the first problem."""
    keys: list[ApiKey] = []
    seen_names: dict[str, int] = {}
    seen_keys: dict[bytes, int] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            key = _parse_line(line, defaults)
        except ValueError as e:
            raise KeyFileError(f"{source}, line {number}: {e}") from None
        if key.name in seen_names:
            raise KeyFileError(f"{source}, line {number}: the name {key.name!r} is already used on line "
                               f"{seen_names[key.name]}")
        if key.secret in seen_keys:
            raise KeyFileError(f"{source}, line {number}: the same key as line {seen_keys[key.secret]}")
        seen_names[key.name], seen_keys[key.secret] = number, number
        keys.append(key)
    if not keys:
        raise KeyFileError(f"{source}: no keys (an empty key file would open the server to everyone)")
    return keys


def _parse_line(line: str, defaults: Limits) -> ApiKey:
    """`NAME: KEY [option=N ...]`; the message of a ValueError never quotes the key."""
    name, colon, rest = line.partition(":")
    name = name.strip()
    if not colon:
        raise ValueError("expected `NAME: KEY [max_concurrent=N] [tpm=N]`")
    if not _NAME.fullmatch(name):
        raise ValueError("a name is 1-64 letters, digits and _ . @ - (starting with a letter or digit)")
    fields = rest.split()
    if not fields:
        raise ValueError(f"no key after {name!r}:")
    secret = fields[0]
    if any(ord(c) < 32 or ord(c) == 127 for c in secret):
        raise ValueError("the key holds control characters (an HTTP header cannot carry them)")
    limits = {}
    for option in fields[1:]:
        opt, eq, value = option.partition("=")
        if opt not in _OPTIONS or not eq:
            raise ValueError(f"unknown option {opt!r} (known: max_concurrent=N, tpm=N)")
        if not value.isascii() or not value.isdigit() or int(value) < 1:
            raise ValueError(f"{opt} must be a positive integer")
        limits[_OPTIONS[opt]] = int(value)
    return ApiKey(name, secret.encode("utf-8"), replace(defaults, **limits))


def load_key_file(path: Path, defaults: Limits) -> list[ApiKey]:
    """The keys of the file at `path` (KeyFileError when it cannot be read or parsed); warns when
    other users may read it."""
    try:
        text = Path(path).read_text(encoding="utf-8")
        mode = os.stat(path).st_mode
    except (OSError, UnicodeDecodeError) as e:
        raise KeyFileError(f"cannot read the key file {path}: {type(e).__name__}: "
                           f"{e.strerror if isinstance(e, OSError) else 'not UTF-8'}") from None
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        log.warning("the key file %s is readable by other users (mode %o): chmod 600 it", path, mode & 0o777)
    return parse_key_file(text, defaults, str(path))


class KeyRing:
    """The accepted keys: the fixed ones plus those of the key file, which `reload()` reads again.
    Swapping one list is the only change, so a request sees either the old keys or the new ones."""

    def __init__(self, fixed: list[ApiKey], path: Path | None, defaults: Limits):
        self.path, self.defaults, self._fixed = path, defaults, fixed
        self._entries = _entries(self._with_file())

    @property
    def required(self) -> bool:
        return bool(self._entries)

    def names(self) -> list[str]:
        return [key.name for _, key in self._entries]

    def find(self, given: bytes) -> ApiKey | None:
        """The key matching `given`. SHA-256 digests are compared, every one of them, each with
        hmac.compare_digest: the time taken says nothing about a key, not even its length."""
        digest = hashlib.sha256(given).digest()
        found = None
        for known, key in self._entries:
            if hmac.compare_digest(digest, known) and found is None:
                found = key
        return found

    def reload(self) -> list[ApiKey]:
        """Read the key file again; on KeyFileError the old keys stay."""
        keys = self._with_file()
        self._entries = _entries(keys)
        return keys

    def _with_file(self) -> list[ApiKey]:
        if self.path is None:
            return list(self._fixed)
        loaded = load_key_file(self.path, self.defaults)
        clash = {k.name for k in self._fixed} & {k.name for k in loaded}
        if clash:
            raise KeyFileError(f"{self.path}: the name {sorted(clash)[0]!r} is taken by a key given on the "
                               "command line or in $DSV32_API_KEY")
        return self._fixed + loaded


def _entries(keys: list[ApiKey]) -> list[tuple[bytes, ApiKey]]:
    return [(hashlib.sha256(key.secret).digest(), key) for key in keys]
