"""The one exception type for mistakes a user can fix: the CLI prints its message as one line and exits 2."""


class UserError(ValueError):
    """A problem with the user's input (flag, file, dataset, model name) and how to fix it, in one line."""
