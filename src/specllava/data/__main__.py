"""``python -m specllava.data build-data ...`` (same as ``specllava build-data ...``)."""

import sys

from .cli import main

sys.exit(main())
