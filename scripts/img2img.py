#!/usr/bin/env python3
"""`python scripts/img2img.py ...`: the same command line as the `img2img` console script (ldm.cli, prog img2img)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a source checkout without installing

from ldm.cli import img2img_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(img2img_main())
