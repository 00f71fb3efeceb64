"""The one exception type for mistakes a user can fix (bad input, bad config).

The CLI prints a UserError as one line and exits with status 2; anything else is a bug
and is allowed to show its traceback.
"""


class UserError(Exception):
    """A problem in the user's input: printed as one line, exit status 2."""
