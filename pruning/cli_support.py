"""What every command-line entry point shares: logging set-up and the one-line error contract."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from pruning.errors import UserError


def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr)


def run_cli(body: Callable[[], int], debug: bool) -> int:
    """Run a command: a UserError becomes ``error: ...`` on stderr and exit code 2, no traceback.

    With ``debug`` the traceback is shown too. Anything that is not a UserError is a bug and propagates.
    """
    try:
        return body()
    except UserError as e:
        if debug:
            logging.exception("user error")
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
