"""The one exception type for mistakes a user can fix, and how it is shown: one line, exit code 2."""


class UserError(ValueError):
    """A problem with the user's input (flag, file, dataset, model name) and how to fix it, in one line.

    ``rank`` is set on errors raised once training started on a process other than 0: such an error may be that
    process's alone (a bad image in its shard), so the line names it.
    """
    rank = None


def first_line(e: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (or its type name), for embedding in a one-line error."""
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:limit]


def error_line(e: BaseException) -> str:
    """The one line to show for a ``UserError``, also when a DataLoader worker raised it (and wrapped it)."""
    text = str(e).strip()
    if 'Original Traceback' in text:  # re-raised from a DataLoader worker: the message is the last line
        text = text.splitlines()[-1].split('UserError: ', 1)[-1]
    return ' '.join(text.split())
