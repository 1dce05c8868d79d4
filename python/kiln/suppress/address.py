"""Recipient address normalisation for the suppression list.

One address, one spelling: surrounding whitespace trimmed, the domain lower-cased and
IDNA-encoded (punycode), the local part kept as given (RFC 5321 says it may be case-sensitive)
unless the caller folds it. The same function serves imports, operator commands and send-time
checks, so an address suppressed under one spelling is found under any other.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from types import ModuleType

_idna: ModuleType | None
try:
    import idna as _idna
except ImportError:  # pragma: no cover - httpx, a dependency, brings it
    _idna = None

__all__ = [
    "MAX_ADDRESS_BYTES",
    "AddressError",
    "all_normal",
    "is_normal",
    "mta_scope",
    "normalise",
]

#: Longest normalised address accepted, in UTF-8 bytes: 64 for the local part, `@`, 255 for
#: the domain (RFC 5321's own path limit, 254, is stricter; exports from other systems can hold
#: longer addresses, and refusing them would lose a suppression, so only the sum is checked).
MAX_ADDRESS_BYTES = 320
#: Longest domain (after IDNA encoding) and label, in octets (RFC 1035).
MAX_DOMAIN_BYTES = 255
MAX_LABEL_BYTES = 63

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_SPACE = re.compile(r"\s")
#: Full stops that IDNA reads as label separators (UTS #46): ideographic, full-width, halfwidth.
_DOTS = str.maketrans({"\u3002": ".", "\uff0e": ".", "\uff61": "."})
#: What an ASCII domain label may hold. Underscores are not valid in host names but do occur in
#: exported lists; accepting them keeps such a suppression instead of dropping it.
_ASCII_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?")
#: An address `normalise` keeps exactly as it is: a plain ASCII local part (letters, digits and
#: the other characters RFC 5322 allows unquoted), one `@`, and a lower-case ASCII domain of
#: labels `_ASCII_LABEL` accepts, none over 63 characters. `is_normal` adds the length bound.
_NORMAL = re.compile(
    r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+@"
    r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?(?:\.[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?)*"
)
#: The same local part, before a domain that may still need lower-casing or IDNA.
_PLAIN = re.compile(r"([A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+)@([^@\s\x00-\x1f\x7f]+)")
#: An address of at most this many characters that `_NORMAL` matches is within every length
#: bound (domain 255, address 320 bytes: it is ASCII).
_NORMAL_MAX_CHARS = MAX_DOMAIN_BYTES


#: A scope an MTA's configuration may name (`kiln exim-config --scope`, `kiln postfix-config
#: --scope`): characters that Postfix's map names and main.cf lists, Exim's string expansion
#: and JSON all take as they are.
_MTA_SCOPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@+=-]{0,127}")


def mta_scope(scope: str) -> str:
    """`scope` when an MTA's configuration can carry it verbatim, else ValueError."""
    if _MTA_SCOPE.fullmatch(scope) is None:
        raise ValueError(
            f"scope {scope!r}: an MTA's configuration takes letters, digits and _ . @ + = - "
            "(a letter or digit first, at most 128 characters)"
        )
    return scope


class AddressError(ValueError):
    """An address kiln cannot hold on its suppression list; the message says why."""


def is_normal(text: str) -> bool:
    """Whether `normalise(text)` is `text` itself, told by one match: a plain ASCII address
    with a lower-case domain, at most 255 characters. False says nothing (`normalise` may
    still accept it, changed or not)."""
    return len(text) <= _NORMAL_MAX_CHARS and _NORMAL.fullmatch(text) is not None


def all_normal(texts: Sequence[str]) -> bool:
    """`is_normal` of every text, a column at a time (one regular-expression match each, no
    call per text)."""
    return max(map(len, texts), default=0) <= _NORMAL_MAX_CHARS and all(
        map(_NORMAL.fullmatch, texts)
    )


def normalise(text: str, *, fold_case: bool = False) -> str:
    """The one spelling of the address `text`, or `AddressError` saying what is wrong with it.

    Trims whitespace (and one pair of angle brackets, as in `<user@example.com>`), lower-cases
    and IDNA-encodes the domain, and keeps the local part as given, lower-cased only with
    `fold_case`. Refuses an address with no `@` or a second one outside a quoted local part,
    an empty part, control characters anywhere, white space outside a quoted local part, a
    domain IDNA cannot encode, and anything over `MAX_ADDRESS_BYTES` once normalised.
    Idempotent: `normalise(normalise(a)) == normalise(a)`.
    """
    plain = _PLAIN.fullmatch(text)
    if plain is not None:  # the usual address: no white space, brackets, quotes or controls
        return _plain(text, plain[1], plain[2], fold_case)
    address = text.strip()
    if address.startswith("<") and address.endswith(">"):
        address = address[1:-1].strip()
    if not address:
        raise AddressError("empty address")
    if _CONTROL.search(address):
        raise AddressError(f"control character in address {address!r}")
    local, at, domain = address.rpartition("@")
    if not at:
        raise AddressError(f"no @ in address {address!r}")
    local = _local_part(local, address)
    domain = _domain(domain, address)
    if fold_case:
        local = local.lower()
    return _sized(f"{local}@{domain}")


def _plain(address: str, local: str, domain: str, fold_case: bool) -> str:
    """`normalise` of an address `_PLAIN` matched (what the general steps would give: nothing
    to trim, no brackets, one `@`, a local part that needs no checks)."""
    ascii_domain = _domain(domain, address)
    if fold_case:
        local = local.lower()
    elif ascii_domain == domain:
        return _sized(address)
    return _sized(f"{local}@{ascii_domain}")


def _sized(result: str) -> str:
    """`result`, or `AddressError` when it is over `MAX_ADDRESS_BYTES`."""
    if len(result) <= MAX_ADDRESS_BYTES // 4:  # 4 bytes a character at most
        return result
    size_bytes = len(result.encode("utf-8"))
    if size_bytes > MAX_ADDRESS_BYTES:
        raise AddressError(
            f"address is {size_bytes} bytes long, over the {MAX_ADDRESS_BYTES} byte limit"
        )
    return result


def _local_part(local: str, address: str) -> str:
    """The local part, checked: quoted (`"..."`, where spaces and `@` may appear) or plain."""
    if not local:
        raise AddressError(f"empty local part in address {address!r}")
    if len(local) >= 2 and local.startswith('"') and local.endswith('"'):
        return local
    if "@" in local:
        raise AddressError(f"more than one @ in address {address!r}")
    if _SPACE.search(local):
        raise AddressError(f"white space in the local part of address {address!r}")
    if '"' in local:
        raise AddressError(f"unbalanced quote in the local part of address {address!r}")
    return local


def _domain(domain: str, address: str) -> str:
    """The domain lower-cased and IDNA-encoded (`_ascii_domain`), or `AddressError`."""
    try:
        return _ascii_domain(domain)
    except _DomainError as exc:
        raise AddressError(f"{exc} in address {address!r}") from None


class _DomainError(ValueError):
    """A domain kiln cannot encode; `normalise` adds the address to the message."""


@functools.lru_cache(maxsize=65536)
def _ascii_domain(domain: str) -> str:
    """`domain` lower-cased and IDNA-encoded label by label, or an address literal as is.

    Cached: the same few domains (gmail.com...) make up most of any list.
    """
    if not domain:
        raise _DomainError("empty domain")
    if domain.startswith("[") and domain.endswith("]"):
        if _SPACE.search(domain):
            raise _DomainError("white space in the domain")
        return domain.lower()
    labels = domain.translate(_DOTS).rstrip(".").split(".")
    result = ".".join([_label(label) for label in labels])
    if len(result) > MAX_DOMAIN_BYTES:
        raise _DomainError(f"domain is {len(result)} bytes, over {MAX_DOMAIN_BYTES}")
    return result


def _label(label: str) -> str:
    """One domain label: ASCII lower-cased and checked, anything else IDNA (UTS #46) encoded."""
    if not label:
        raise _DomainError("empty label in the domain")
    if label.isascii():
        ascii_label = label.lower()
    else:
        try:
            ascii_label = _idna_label(label)
        except UnicodeError as exc:
            raise _DomainError(f"domain label {label!r} is not valid IDNA: {exc}") from None
    if not _ASCII_LABEL.fullmatch(ascii_label):
        raise _DomainError(f"invalid domain label {label!r}")
    if len(ascii_label) > MAX_LABEL_BYTES:
        raise _DomainError(f"domain label {label!r} is over {MAX_LABEL_BYTES} bytes")
    return ascii_label


def _idna_label(label: str) -> str:
    """`label` (not all ASCII) as its `xn--` form: the `idna` package's IDNA 2008 with UTS #46
    mapping (case folding, width), or the standard library's IDNA 2003 where it is missing."""
    if _idna is None:  # pragma: no cover - httpx brings it
        return label.encode("idna").decode("ascii").lower()
    encoded: bytes = _idna.encode(label, uts46=True)
    return encoded.decode("ascii")
