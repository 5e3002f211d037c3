"""``python -m shoal.common.cli``: the same as the ``shoal`` script."""

import sys

from shoal.common.cli import main

sys.exit(main())
