"""Stage track: log this pipeline result to MLflow as exactly one run (see kdprune/tracking/).

Exit 2: a result that must not be logged (an accuracy or compression number that is NaN, inf or
missing), a read-only store, or a tracking server that refuses the credentials (401/403); exit 3: the
store is unreachable (a tracking server: still, after KDPRUNE_MLFLOW_WAIT_S seconds of retries; the
results stay in metrics/).
"""
import sys

from kdprune import stage
from kdprune.params import Params
from kdprune.tracking.pipeline import log_pipeline
from kdprune.tracking.store import TrackingError, TrackingUserError


def main(params: Params) -> None:
    if not params.mlflow.enabled:
        stage.log("track: mlflow.enabled is false; nothing logged")
        return
    try:
        log_pipeline()
    except TrackingUserError as e:
        raise stage.StageError(str(e)) from None
    except TrackingError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(3)


if __name__ == "__main__":
    stage.run(main, doc=__doc__)
