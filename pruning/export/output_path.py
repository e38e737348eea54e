"""Whether the GGUF export may create its file at a path, said before any work and in the user's terms.

The export writes a hidden temporary file beside the output and hard-links it to the output's name,
which fails on any existing name, so nothing is ever replaced. Without this check an existing name was
found only after the whole export (a dangling symbolic link, which ``Path.exists`` calls absent, was
then reported as a file "that appeared while the export ran"), or was described wrongly (a directory
"exists; the export never replaces a file").

A symbolic link at the output path is refused, also one that points nowhere: replacing the link (what
an atomic rename would do) breaks the rule "never delete or overwrite what the tool did not write", and
writing through it would put the file wherever the link points, which the user did not name. Links in
the directories above the output are followed as usual; one that points nowhere is named.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from pruning.errors import UserError
from pruning.storage.fs import os_error_reason

_NOT_REPLACED = "the export writes a new file and never replaces anything (choose another name)"
_SPECIAL_KINDS = (
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def check_output_path(out: Path) -> None:
    """Refuse an output path that holds anything (a file, a directory, a link, a FIFO, a device), or
    whose directory cannot be made: a UserError naming the path and what is there."""
    problem = _what_is_at(out)
    if problem is None:
        problem = _directory_problem(out)
    if problem is not None:
        raise UserError(f"{out}: {problem}")


def _what_is_at(out: Path) -> str | None:
    try:
        mode = os.lstat(out).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return None  # a new name (a file on the way is the directory check's to name)
    except OSError as e:
        return f"cannot write here: {os_error_reason(e)}"
    if stat.S_ISLNK(mode):
        return f"is {_link(out)}; the export writes a new file, never through a link or over one"
    if stat.S_ISDIR(mode):
        return "is a directory; give the name of the .gguf file to write"
    if stat.S_ISREG(mode):
        return "exists; the export never replaces a file (choose another name or remove it)"
    kind = next((name for test, name in _SPECIAL_KINDS if test(mode)), "not a regular file")
    return f"is {kind}; {_NOT_REPLACED}"


def _directory_problem(out: Path) -> str | None:
    """Why the output's directory cannot be made or used: the nearest existing entry above the output
    must be a directory, possibly through links that resolve."""
    for above in out.parents:
        if not os.path.lexists(above):
            continue
        if os.path.islink(above) and not os.path.exists(above):
            return f"cannot write here: {above} is {_link(above)}"
        if not os.path.isdir(above):
            return f"cannot write here: {above} is not a directory"
        return None
    return None


def _link(path: Path) -> str:
    """ "a symbolic link to T", and whether T exists, in words."""
    try:
        target = os.readlink(path)
    except OSError as e:
        return f"a symbolic link that cannot be read ({os_error_reason(e)})"
    try:
        os.stat(path)
    except FileNotFoundError:
        return f"a symbolic link to {target}, which does not exist"
    except OSError as e:
        if e.errno == errno.ELOOP:
            return f"a symbolic link to {target}, which leads round in a loop of links"
        return f"a symbolic link to {target}, which cannot be reached ({os_error_reason(e)})"
    return f"a symbolic link to {target}"
