"""``python -m pgrepl.cli``: the ``pgrepl`` command."""

import sys

from pgrepl.cli import main

sys.exit(main())
