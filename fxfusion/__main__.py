"""``python -m fxfusion``: the same program as the ``fxfusion`` command."""

from __future__ import annotations

import sys

from fxfusion.cli import main

if __name__ == "__main__":
    sys.exit(main())
