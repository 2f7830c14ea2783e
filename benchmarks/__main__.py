"""``python -m benchmarks``: see :mod:`benchmarks` and ``python -m benchmarks --help``."""

from __future__ import annotations

import sys

from benchmarks.cli import main

sys.exit(main())
