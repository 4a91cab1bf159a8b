"""The one exception type that means "the user asked for something we cannot do"."""


class UserError(ValueError):
    """Bad input: the CLI prints the message on one line and exits with code 2.

    The message names the problem and, where there is one, the fix.
    """
