"""Alias of kdprune.experiments.frontier, kept so that ``python -m kdprune.frontier`` works as before."""
import sys

from kdprune.experiments.frontier import main

if __name__ == "__main__":
    sys.exit(main())
