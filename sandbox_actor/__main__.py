"""``python -m sandbox_actor``: run a sandbox host (and optionally the placement actor)."""

import sys

from sandbox_actor._main import main

sys.exit(main())
