"""Alias of kdprune.experiments.runcache, kept so that ``python -m kdprune.runcache`` works as before."""
import sys

from kdprune.experiments.runcache import main

if __name__ == "__main__":
    sys.exit(main())
