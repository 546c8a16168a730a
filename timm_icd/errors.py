"""The one exception type for mistakes a user can fix: the CLI prints its message as one line and exits 2."""


class UserError(ValueError):
    """A problem with the user's input (flag, file, dataset, model name) and how to fix it, in one line."""


def first_line(e: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (or its type name), for embedding in a one-line error."""
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:limit]
