"""What every JSON report (convert, verify, inspect) starts with: its schema version and kind.

``report_schema.json`` beside this module is the JSON Schema the reports follow; the
version below changes only when a field is removed or changes meaning (new optional
fields keep it).
"""

from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path

SCHEMA_VERSION = 1
SCHEMA_PATH = Path(__file__).with_name("report_schema.json")


def qlower_version() -> str:
    """The installed qlower's version, from the package metadata."""
    try:
        return metadata.version("qlower")
    except metadata.PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown"


def header(kind: str) -> dict[str, object]:
    """The fields every report starts with."""
    return {"schema": SCHEMA_VERSION, "kind": kind, "qlower_version": qlower_version()}


def load_schema() -> dict[str, object]:
    """The JSON Schema every report validates against (draft 2020-12)."""
    return json.loads(SCHEMA_PATH.read_text())
