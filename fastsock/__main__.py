"""``python -m fastsock``: the ``fastsock`` command (see ``fastsock.cli``)."""

import sys

from fastsock.cli import main

sys.exit(main())
