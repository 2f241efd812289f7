"""`python -m svdexport.cli ...`: the same as the `svdexport` console script."""

import sys

from svdexport.cli import main

sys.exit(main())
