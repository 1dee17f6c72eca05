"""The API's edge: a request's input decoded and checked, an answer encoded.

Everything a handler takes from a request passes through here before any rule or
state sees it: names and ids from the URL (`ref`), JSON bodies with only known
fields (`json_body`), and the value checks of the bodies' fields, all drawn from
the one vocabulary (`flynnp2p.vocab`) so the API, the records and the CLI accept
the same names. A bad value is a `UserError` (400) that names the field, says what
it got and what is accepted; nothing past the edge runs.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from typing import Any

from quart import Response, jsonify, request

from flynnp2p import vocab
from flynnp2p.errors import UserError
from flynnp2p.state.records import ENV_VALUE, PROCESS_TYPE
from flynnp2p.state.schema import Dict, Int, Seq, Str
from flynnp2p.vocab import show

IDEMPOTENCY_HEADER = "Idempotency-Key"

COUNTS = Dict(PROCESS_TYPE, Int(0, 10_000), max_items=64)
CONSTRAINTS = Dict(
    PROCESS_TYPE, Dict(Str.of(vocab.TAG_KEY), Str.of(vocab.TAG_VALUE), max_items=16), max_items=64
)
DIGEST = Str.of(vocab.DIGEST)
ENV_SET = Dict(Str.of(vocab.ENV_NAME), ENV_VALUE)
ENV_UNSET = Seq(Str.of(vocab.ENV_NAME), max_items=256)


def ref(what: str, value: str) -> str:
    """A name or id taken from the URL path."""
    if not vocab.ID.ok(value):
        raise UserError(f"{what}: expected a name or id of {vocab.ID.accepted}, got {show(value)}")
    return value


def app_name(value: object) -> str:
    return vocab.APP_NAME.check("name", value)


def idempotency_key() -> str | None:
    """The request's ``Idempotency-Key`` (a retry of a create answers with what the
    first attempt made), or None."""
    value = request.headers.get(IDEMPOTENCY_HEADER)
    if not value:
        return None
    if not vocab.IDEMPOTENCY_KEY.ok(value):
        raise UserError(
            f"{IDEMPOTENCY_HEADER}: expected {vocab.IDEMPOTENCY_KEY.accepted} (a uuid is a good one)"
        )
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


async def json_body(
    allowed: Collection[str], required: Collection[str] = (), *, empty_ok: bool = False
) -> dict[str, Any]:
    """The request's JSON object; only `allowed` fields, all `required` ones present.

    Bodies over MAX_CONTENT_LENGTH never get here (quart answers 413).
    """
    data = await request.get_data(cache=True, as_text=False, parse_form_data=False)
    if not data.strip():
        if empty_ok:
            return {}
        raise UserError("body: expected a JSON object, got an empty body")
    try:
        body = json.loads(data, parse_constant=_no_constant)
    except RecursionError:
        raise UserError("body: JSON nested too deeply") from None
    except ValueError as exc:
        raise UserError(f"body: not valid JSON ({show(str(exc), 120)})") from None
    if not isinstance(body, dict):
        raise UserError(f"body: expected a JSON object, got {type(body).__name__}")
    unknown = sorted(k for k in body if k not in allowed)
    if unknown:
        raise UserError(f"body: unknown field(s) {show(unknown, 200)}; accepted: {sorted(allowed)}")
    for name in required:
        if name not in body:
            raise UserError(f"body.{name}: missing (required)")
    return body


def answer(body: Mapping[str, object], status: int = 200) -> Response:
    resp = jsonify(body)
    resp.status_code = status
    return resp
