"""Where the test data lives (imported by test modules as ``paths``)."""

from __future__ import annotations

import json
from pathlib import Path


TESTS = Path(__file__).resolve().parent
ZOO_DIR = TESTS / "data" / "zoo"
BREVITAS_DIR = TESTS / "fixtures" / "brevitas"
ZOO_MODELS = sorted(ZOO_DIR.glob("*.onnx"))
BREVITAS_MANIFEST: list[dict] = json.loads((BREVITAS_DIR / "manifest.json").read_text())
REAL_DIR = BREVITAS_DIR / "real"
REAL_MANIFEST: list[dict] = json.loads((REAL_DIR / "manifest.json").read_text())
