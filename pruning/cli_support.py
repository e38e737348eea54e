"""What every command-line entry point shares: logging set-up and the one-line error contract."""

from __future__ import annotations

import errno
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable

from pruning.errors import Terminated, UserError
from pruning.storage.fs import DISK_ERRNOS, disk_errno

EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE  # what a shell reports for a reader that went away (141)


def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr)


def run_cli(body: Callable[[], int], debug: bool) -> int:
    """Run a command: bad input becomes ``error: ...`` on stderr, one line, exit code 2, no traceback.

    Bad input is a UserError, or a disk that is full, read-only or over a size limit (named as such).
    With ``debug`` the traceback is shown too. Anything else is a bug and propagates with its traceback.
    A closed pipe (``| head``) ends the command quietly.
    """
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous_handler = signal.signal(signal.SIGTERM, _raise_terminated) if in_main_thread else None
    try:
        return body()
    except UserError as e:
        return _fail(str(e), e.exit_code, debug)
    except Terminated:
        print("terminated", file=sys.stderr)
        return Terminated.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    except Exception as e:
        code = disk_errno(e)
        if code is None:
            raise
        where = getattr(e, "filename", None)
        prefix = f"{where}: " if where else ""
        return _fail(f"{prefix}{DISK_ERRNOS[code]} ({errno.errorcode[code]})", 2, debug)
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous_handler)


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated()


def _fail(message: str, exit_code: int, debug: bool) -> int:
    if debug:
        logging.exception("error")
    print(f"error: {message}", file=sys.stderr)
    return exit_code


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush does not complain about the pipe."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass  # stdout is not a real file (captured): nothing will be flushed to a pipe
