"""``python -m cli``: the same as the ``nerve`` command (used to spawn role processes)."""

import sys

from cli import main

sys.exit(main())
