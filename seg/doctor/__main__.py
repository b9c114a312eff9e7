"""``python -m seg.doctor``: the same as ``seg doctor``."""

import sys

from seg.doctor import main

sys.exit(main())
