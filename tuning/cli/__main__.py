"""``python -m tuning.cli``: what the ``schedtune`` console script runs (Ray jobs use this form)."""
import sys

from tuning.cli import main

sys.exit(main())
