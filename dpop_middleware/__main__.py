"""``python -m dpop_middleware``: the command-line tool (see :mod:`dpop_middleware.cli`)."""

import sys

from dpop_middleware.cli import main

sys.exit(main())
