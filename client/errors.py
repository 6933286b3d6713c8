"""One exception for every bad input the user can fix; the CLI prints its message and exits 2."""


class UserError(Exception):
    """A problem with the user's input: the message names the file, the value and the fix."""
