"""`python -m permeant_tui.cli ...`: the same as the `permeant` console script."""

import sys

from . import main

sys.exit(main())
