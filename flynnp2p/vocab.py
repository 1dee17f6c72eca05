"""The one vocabulary of names and keys: what each accepts, and how to say so.

Every name a user or a peer can give (an app's name, a process type, a host tag,
an env key, a domain, a digest…) is checked against one `Term` defined here: the
record schema (`flynnp2p.state.records`), the API's edge (`flynnp2p.api.edge`),
the node's configuration (`flynnp2p.config`) and the CLI all import these, so a
name the CLI accepts is one the API and every peer accept too, with the same
limits and the same words in the error.

A term is a regular expression matched whole (`re.fullmatch`, never `match`:
``$`` would accept a trailing newline), a maximum length, and ``accepted``: the
phrase an error uses for what would have been right. Pure, a leaf (imports only
the standard library and the error tree), so the CLI can use it without loading
the schema.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from flynnp2p.errors import UserError


def show(value: object, limit: int = 60) -> str:
    """A value as an error message quotes it: repr, cut at ``limit`` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(frozen=True)
class Term:
    regex: str
    accepted: str
    max_len: int
    min_len: int = 1
    _compiled: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_compiled", re.compile(self.regex))

    def ok(self, value: object) -> bool:
        return (
            type(value) is str
            and self.min_len <= len(value) <= self.max_len
            and self._compiled.fullmatch(value) is not None
        )

    def check(self, what: str, value: object) -> str:
        """`value` if it is one; else a `UserError` naming `what` and what is accepted."""
        if not self.ok(value):
            raise UserError(f"{what}: expected {self.accepted}, got {show(value)}")
        assert isinstance(value, str)
        return value


_DNS_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"

ID = Term(
    r"[A-Za-z0-9][A-Za-z0-9_.:@-]{0,127}",
    "1-128 letters, digits and _.:@-, starting with a letter or digit",
    128,
)
APP_NAME = Term(
    r"[a-z][a-z0-9]{0,62}(?:-[a-z0-9]{1,62}){0,16}",
    "1 to 63 lowercase letters, digits and single dashes, starting with a letter "
    "and not ending with a dash",
    63,
)
PROCESS_TYPE = Term(
    r"[A-Za-z0-9][A-Za-z0-9_-]{0,62}",
    "a process type: 1-63 letters, digits, _ and -, starting with a letter or digit",
    63,
)
NODE_NAME = Term(
    r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}",
    "a node name: 1-63 letters, digits, _ . and -, starting with a letter or digit",
    63,
)
ENV_NAME = Term(
    r"[A-Za-z_][A-Za-z0-9_]{0,255}",
    "an environment variable name ([A-Za-z_][A-Za-z0-9_]*, up to 256 characters)",
    256,
)
LABEL = Term(
    r"[A-Za-z0-9][A-Za-z0-9_.:/-]{0,127}",
    "1-128 letters, digits and _.:/-, starting alphanumeric",
    128,
)
TAG_KEY = Term(
    r"[a-z][a-z0-9_.-]{0,30}",
    "lowercase letters, digits and _.- (a host tag name: 1-31, starting with a letter)",
    31,
)
TAG_VALUE = Term(
    r"[A-Za-z0-9_.:/-]{0,128}",
    "a host tag value: up to 128 letters, digits and _.:/-",
    128,
    min_len=0,
)
HOSTNAME = Term(
    rf"(?:{_DNS_LABEL}\.)*{_DNS_LABEL}",
    "a lowercase DNS name (labels of letters, digits and inner dashes, joined by dots)",
    253,
)
DOMAIN = Term(
    rf"(?:\*\.)?(?:{_DNS_LABEL}\.)*{_DNS_LABEL}",
    "a lowercase DNS name, optionally starting with '*.'",
    253,
)
PATH = Term(r"/[^\s?#]{0,1023}", "a URL path starting with '/', without spaces, '?' or '#'", 1024)
DIGEST = Term(r"sha256:[0-9a-f]{64}", "'sha256:' and 64 lowercase hex digits", 71)
ADDRESS = Term(r"[A-Za-z0-9_.:\[\]-]{1,255}:[0-9]{1,5}", "'host:port'", 261)
GIT_REF = Term(r"refs/[!-~]{1,250}", "a git ref name (refs/...)", 255)
GIT_OID = Term(r"[0-9a-f]{40}(?:[0-9a-f]{24})?", "a git object id (hex)", 64)
IDEMPOTENCY_KEY = Term(r"[A-Za-z0-9_.:-]{1,128}", "1-128 letters, digits and _.:-", 128)
