"""The one exception type that means "the user asked for something we cannot do".

The CLIs print these as a single line and exit non-zero; anything else is a bug and keeps
its traceback.
"""


class UserError(Exception):
    """Bad input or an unmet precondition; the message says what was wrong and what to do."""
