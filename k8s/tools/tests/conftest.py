"""The chart tools are scripts, not a package: their directory is put on the import path."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
