"""The one exception type that means "the user's input is wrong", reported as one line and exit code 2."""

from __future__ import annotations


class UserError(Exception):
    """Bad input (a file, a config key, a flag): the message names it and says what is wrong.

    Command-line entry points print ``error: <message>`` on one line and exit with code 2; anything
    else that escapes is a bug and keeps its traceback.
    """

    exit_code = 2


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is so that clean-up (staging directory, lock) runs as for Ctrl-C."""

    exit_code = 143
