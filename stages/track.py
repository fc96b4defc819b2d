"""Stage track: log this pipeline result to MLflow as exactly one run (see kdprune/tracking.py)."""
import sys

from kdprune import stage
from kdprune.params import Params
from kdprune.tracking import TrackingError, log_pipeline


def main(params: Params) -> None:
    if not params.mlflow.enabled:
        stage.log("track: mlflow.enabled is false; nothing logged")
        return
    try:
        log_pipeline()
    except TrackingError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(3)


if __name__ == "__main__":
    stage.run(main, doc=__doc__)
