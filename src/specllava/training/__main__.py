import sys

from specllava.training.cli import main

sys.exit(main())
