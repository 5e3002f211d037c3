"""``python -m shoal.client sessions|keys|secrets|runner …``: the client CLI."""

import sys

from shoal.client.cli import main

sys.exit(main())
