"""Alias of kdprune.experiments.compare, kept so that ``python -m kdprune.compare`` works as before."""
import sys

from kdprune.experiments.compare import main

if __name__ == "__main__":
    sys.exit(main())
