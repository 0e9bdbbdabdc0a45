"""``python -m catstream``: the same command as ``catstream``."""

import sys

from catstream.cli import main

sys.exit(main())
