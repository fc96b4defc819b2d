"""The base of the errors a user can fix (bad params, data, checkpoints, a diverged run).

A stage catches every ``UserError`` (and the older per-module errors listed in ``kdprune.stage.USER_ERRORS``)
and exits 2 with the one-line message, no traceback. This module imports nothing, so any module can
raise these errors without pulling in another one's dependencies.
"""


class UserError(Exception):
    """An error whose message says what the user must change; stages print it on one line and exit 2."""
