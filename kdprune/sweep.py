"""Alias of kdprune.experiments.sweep, kept so that ``python -m kdprune.sweep`` works as before."""
import sys

from kdprune.experiments.sweep import main

if __name__ == "__main__":
    sys.exit(main())
