"""Alias of kdprune.experiments.study, kept so that ``python -m kdprune.study`` works as before."""
import sys

from kdprune.experiments.study import main

if __name__ == "__main__":
    sys.exit(main())
