"""How records and values appear in API answers and error messages."""

from __future__ import annotations

from flynnp2p.state.records import Certificate, Record


def wire(record: Record) -> dict[str, object]:
    """A record as the API shows it: its wire form without the schema version."""
    out = record.to_wire()
    del out["v"]
    if isinstance(record, Certificate):
        out["key_pem"] = "(redacted)"
    return out
