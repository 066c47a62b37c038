"""pytest configuration: makes tests/python importable as a package root for `utils`."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
