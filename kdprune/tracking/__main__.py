"""The CLI: ``python -m kdprune.tracking relog`` logs the current metrics/ and plots/ to MLflow (for a result
already logged, it restores the run's missing artifacts and models); ``uri`` prints the tracking URI.
"""
from __future__ import annotations

import argparse
import sys

from kdprune.tracking.pipeline import log_pipeline
from kdprune.tracking.store import TrackingError, redact, tracking_uri

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kdprune.tracking", description="MLflow logging for kdprune.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("relog", help="log the current metrics/ and plots/ to MLflow; for a result already logged, "
                                 "restore its missing artifacts and models")
    sub.add_parser("uri", help="print the tracking URI that would be used (its password, if any, as ***)")
    args = ap.parse_args(argv)
    if args.cmd == "uri":
        print(redact(tracking_uri()))
        return 0
    try:
        log_pipeline()
    except TrackingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
