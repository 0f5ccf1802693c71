"""The one exception type the command line turns into a one-line message and exit code 2."""


class UserError(Exception):
    """Bad input or an environment problem the user can fix; never a bug in nfsd-nerf.

    The message is shown as is, on one line, without a traceback.
    """


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type's name if it has none), for one-line errors."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
