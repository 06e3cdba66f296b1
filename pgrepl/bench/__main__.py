"""``python -m pgrepl.bench``: the same as the ``pgrepl-bench`` command."""

import sys

from pgrepl.bench.cli import main

sys.exit(main())
