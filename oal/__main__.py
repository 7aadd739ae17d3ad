"""`python -m oal ...`: the same command line as the `oal` script."""

import sys

from oal.cli import main

sys.exit(main())
