"""Alias of kdprune.experiments.report, kept so that ``python -m kdprune.report`` works as before."""
import sys

from kdprune.experiments.report import main

if __name__ == "__main__":
    sys.exit(main())
