"""``python -m safedlora_lab.compare``: the same as the ``safedlora`` console script."""

import sys

from .cli import main

sys.exit(main())
