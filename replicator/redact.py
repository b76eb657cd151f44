"""Secret redaction: what keeps passwords out of logs, error lines and printed settings.

Errors and logs are the two ways a secret could escape, so ``errors.ReplicatorError`` and the
formatters in ``logs`` pass every string through ``redact``. The loader registers each
password it resolves (and .env values whose names say they are secret) with
``register_secret`` before anything else can print them.
"""

from __future__ import annotations

import re
import threading
import urllib.parse

__all__ = ["MASK", "clear_secrets", "redact", "register_secret"]

MASK = "***"

# conninfo keyword form (password=secret, password = 'se cret'), a TOML line
# (password = "x"), and a URI query (?password=x&...)
_KV_PASSWORD = re.compile(
    r"""(?P<key>\bpassword\s*=\s*)(?P<val>'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*"|[^\s&'"]+)""",
    re.IGNORECASE,
)
# dict or JSON form: 'password': 'x' / "password": "x"
_DICT_PASSWORD = re.compile(
    r"""(?P<key>['"]password['"]\s*:\s*)(?P<q>['"])(?:(?!(?P=q))[^\\]|\\.)*(?P=q)""",
    re.IGNORECASE,
)
# URI userinfo: postgresql://user:secret@host
_URI_PASSWORD = re.compile(r"(?P<key>\b[a-z][a-z0-9+.-]*://[^:/@\s]*:)(?P<val>[^@\s/]+)(?=@)")

_secrets_lock = threading.Lock()
_secrets: set[str] = set()
_secrets_re: re.Pattern[str] | None = None


def register_secret(value: object) -> None:
    """Make ``redact`` mask ``value`` (and its URL-encoded forms) wherever it appears.

    A secret shorter than 8 characters is masked only where it stands alone (not inside a
    longer word): masking every "odoo" in "odoo_core", or every "x", would make logs and
    error lines unreadable, and inside a longer word a short string gives nothing away.
    ``password=...`` in conninfo strings and URIs is masked whatever its length.
    """
    global _secrets_re
    if value is None or value == "":
        return
    value = str(value)  # a TOML password written as a number is still a secret
    forms = {value, urllib.parse.quote(value, safe=""), urllib.parse.quote_plus(value)}
    with _secrets_lock:
        if forms <= _secrets:
            return
        _secrets.update(forms)
        # Longest first, so a secret that contains another is masked whole.
        ordered = sorted(_secrets, key=len, reverse=True)
        _secrets_re = re.compile("|".join(map(_secret_pattern, ordered)))


_WORD = r"[A-Za-z0-9_]"
_SHORT_SECRET = 8


def _secret_pattern(secret: str) -> str:
    if len(secret) >= _SHORT_SECRET:
        return re.escape(secret)
    return rf"(?<!{_WORD}){re.escape(secret)}(?!{_WORD})"


def clear_secrets() -> None:
    """Forget every registered secret (for tests)."""
    global _secrets_re
    with _secrets_lock:
        _secrets.clear()
        _secrets_re = None


def redact(text: str) -> str:
    """``text`` with passwords in conninfo strings and URIs and all registered secrets masked."""
    if not text:
        return text
    text = _KV_PASSWORD.sub(rf"\g<key>{MASK}", text)
    text = _DICT_PASSWORD.sub(rf"\g<key>\g<q>{MASK}\g<q>", text)
    text = _URI_PASSWORD.sub(rf"\g<key>{MASK}", text)
    pattern = _secrets_re  # one read: register_secret may swap it concurrently
    if pattern is not None:
        text = pattern.sub(MASK, text)
    return text
