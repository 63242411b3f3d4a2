"""``python -m specllava.data build-data ...`` (same as ``specllava build-data ...``)."""

from .cli import main

main()
