#!/usr/bin/env python3
"""`python scripts/txt2img.py ...`: the same command line as the `txt2img` console script (ldm.cli)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a source checkout without installing

from ldm.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
