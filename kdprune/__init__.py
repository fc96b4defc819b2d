"""kdprune: prune a network, then recover its accuracy by distilling from the unpruned teacher."""

__version__ = "0.1.0"
