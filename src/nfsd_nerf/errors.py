"""The one exception type the command line turns into a one-line message and exit code 2."""


class UserError(Exception):
    """Bad input or an environment problem the user can fix; never a bug in nfsd-nerf.

    The message is shown as is, on one line, without a traceback.
    """
