"""The one exception type for mistakes a user can fix."""


class AmasError(Exception):
    """A user-facing error: one line naming the cause and the fix."""
