"""The one exception type for mistakes a user can fix."""


class UserError(Exception):
    """An error the user can fix; the CLI prints its message as one line and exits 1."""
