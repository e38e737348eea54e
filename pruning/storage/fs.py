"""Small filesystem primitives the output directory is built on: safe deletion, atomic swaps, disk errors.

Deletion here never follows a symlink: a link is removed as a link, and a directory is removed only
when it is a real directory and empty, so nothing outside the tree (or not listed) can go with it.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import stat
import tempfile
from collections.abc import Iterable
from pathlib import Path

# Errors that mean "the disk or the permissions are the problem", not a bug: reported in one line.
DISK_ERRNOS = {
    errno.ENOSPC: "no space left on the device",
    errno.EFBIG: "file too large for the file size limit (ulimit -f) or the filesystem",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only filesystem",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}
# The ones no part of the run can work around: a hook hitting them fails the run whatever its on_error.
SPACE_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}
_OS_ERROR_RE = re.compile(r"os error (\d+)")
_MOUNTINFO_ESCAPE = re.compile(r"\\([0-7]{3})")  # mountinfo writes a space in a path as \040
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def current_umask() -> int:
    """The process umask (reading it means setting it; it is put back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def disk_errno(error: BaseException) -> int | None:
    """The errno of a disk or permission failure, also when a Rust library reports it in its message."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        code = getattr(error, "errno", None) if isinstance(error, OSError) else None
        if code is None:  # safetensors: "I/O error: File too large (os error 27)"
            match = _OS_ERROR_RE.search(str(error))
            code = int(match.group(1)) if match else None
        if code in DISK_ERRNOS:
            return code
        error = error.__cause__ or error.__context__
    return None


def is_mount_point(path: Path) -> bool:
    """Also true for a bind mount on the same filesystem, which ``os.path.ismount`` misses."""
    if os.path.ismount(path):
        return True
    real = os.path.realpath(path)
    try:
        with open("/proc/self/mountinfo", encoding="utf-8") as f:
            points = [line.split()[4] for line in f if len(line.split()) > 4]
    except OSError:
        return False  # not Linux: ismount is all there is
    return any(_MOUNTINFO_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), p) == real for p in points)


def exchange(a: Path, b: Path) -> bool:
    """Swap two directory entries atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False if unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    result = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False  # this filesystem or kernel cannot swap; the caller falls back to two renames
    raise OSError(code, os.strerror(code), str(a), None, str(b))


def remove_listed(root: Path, relative_paths: Iterable[str]) -> list[Path]:
    """Delete the listed files under ``root``, then directories left empty; return what remains.

    A listed path that is a directory or resolves outside ``root`` is not touched (and so remains).
    """
    root_real = os.path.realpath(root)
    for rel in relative_paths:
        path = root / rel
        parent_real = os.path.realpath(path.parent)
        if not (parent_real == root_real or parent_real.startswith(root_real + os.sep)):
            continue
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            continue
        if stat.S_ISREG(mode) or stat.S_ISLNK(mode):
            path.unlink()
    _remove_empty_dirs(root)
    if not root.is_dir() or root.is_symlink():
        return []
    return sorted(p for p in root.rglob("*") if p.is_symlink() or not p.is_dir())


def _remove_empty_dirs(root: Path) -> None:
    """Remove real directories under (and including) ``root`` that are empty, deepest first."""
    for dirpath, _dirnames, _files in os.walk(root, topdown=False, followlinks=False):
        path = Path(dirpath)
        if path.is_symlink():
            continue
        with contextlib.suppress(OSError):  # not empty: something not listed is inside, and stays
            path.rmdir()


def remove_tree(path: Path) -> None:
    """Delete a directory this package created (a staging directory), links removed as links."""
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
        return
    for dirpath, dirnames, filenames in os.walk(path, topdown=False, followlinks=False):
        for name in filenames:
            os.unlink(os.path.join(dirpath, name))
        for name in dirnames:
            child = os.path.join(dirpath, name)
            if os.path.islink(child):
                os.unlink(child)
            else:
                os.rmdir(child)
    path.rmdir()


def os_error_reason(error: OSError) -> str:
    """A disk's state (full, read-only, ...) as named in DISK_ERRNOS, else the OS's own words."""
    code = disk_errno(error)
    return DISK_ERRNOS[code] if code is not None else (error.strerror or str(error)).lower()


def replace_problem(path: Path) -> str | None:
    """Why a file may not be written at ``path`` by rename, or None: the rename would replace whatever
    is there, so only a regular file or a new name may be (a symlink, a FIFO or ``/dev/stdout`` would be
    replaced by a regular file, and a directory cannot be)."""
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return None  # nothing there (or no way there): the write itself says what is wrong
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "is a directory; give a file name"
    kind = "a symbolic link" if stat.S_ISLNK(mode) else "not a regular file (a FIFO, device or socket)"
    return f"is {kind}; the tool writes only a regular file or a new name, and would replace it"


def write_bytes_atomic(path: Path, data: bytes) -> Path:
    """Write a temporary file beside ``path``, then rename: readers see the old file or the whole new one.

    The file gets the mode a plain ``open`` would give it (0666 less the umask), not mkstemp's 0600. A
    path that cannot be written (read-only, a file on the way, a name too long) or that holds anything
    but a regular file (``replace_problem``) is the user's error.
    """
    from pruning.errors import UserError

    problem = replace_problem(path)
    if problem is not None:
        raise UserError(f"{path}: {problem}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise UserError(f"{path}: cannot write here: {os_error_reason(e)}") from e
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~current_umask())
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


NAME_MAX = 255  # bytes in one path component (Linux, and most filesystems)
PATH_MAX = 4096  # bytes in a whole path (Linux)


def relative_path_problem(name: object) -> str | None:
    """Why ``name`` cannot be a file inside a directory on this platform, or None when it can: a
    relative path of non-empty components, none ``.`` or ``..``, none longer than ``NAME_MAX`` bytes,
    no control character (NUL included), at most ``PATH_MAX`` bytes in all. A run's manifest holds
    only such names, so removing what it lists can never fail on a name or leave the directory."""
    if not isinstance(name, str) or not name:
        return "must be a non-empty path"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return "must not contain a control character"
    try:
        encoded = os.fsencode(name)
        name.encode("utf-8")  # a lone surrogate (a non-UTF-8 name) could not be written into run.json
    except UnicodeError:
        return "must be a UTF-8 file name"
    if len(encoded) > PATH_MAX:
        return f"is longer than {PATH_MAX} bytes"
    parts = name.split("/")
    if name.startswith("/") or any(part in ("", ".", "..") for part in parts):
        return "must be a path inside the run's directory"
    if any(len(os.fsencode(part)) > NAME_MAX for part in parts):
        return f"has a component longer than {NAME_MAX} bytes"
    return None


MiB = 1 << 20
# The most bytes each kind of file the tool reads whole may hold: far above any real one (Gemma's
# tokenizer.json is 33 MB), far below what would exhaust memory, so /dev/zero is refused, not read.
MAX_CONFIG_BYTES = 16 * MiB
MAX_JSON_BYTES = 512 * MiB
MAX_TEXT_BYTES = 1024 * MiB


def open_regular_file(path: str | os.PathLike[str], *, what: str) -> tuple[int, os.stat_result]:
    """A blocking read-only descriptor of a regular file, and its ``fstat``; anything else (a FIFO, which
    would block, a device, a directory) is the user's error, named before a byte is read. Opened
    without blocking and checked on the open descriptor, so a rename in between cannot fool the check."""
    from pruning.errors import UserError

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError as e:
        raise UserError(f"{path}: {what} not found") from e
    except OSError as e:
        raise UserError(f"{path}: cannot read the {what} ({os_error_reason(e)})") from e
    try:
        info = os.fstat(fd)
    except OSError as e:
        os.close(fd)
        raise UserError(f"{path}: cannot read the {what} ({os_error_reason(e)})") from e
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        if stat.S_ISDIR(info.st_mode):
            raise UserError(f"{path}: is a directory, not a {what}")
        raise UserError(f"{path}: not a regular file (a FIFO, device or socket); give a {what} file")
    os.set_blocking(fd, True)
    return fd, info


def read_regular_file(path: str | os.PathLike[str], *, what: str, limit: int) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes; anything else is the user's error, named.

    Every file the tool reads whole comes through here, so a FIFO (which would block), a device
    (``/dev/zero`` never ends) or a directory is refused in one line before a byte is read: the file is
    opened without blocking, checked with ``fstat`` on the open descriptor (no race with a rename), and
    read to at most ``limit`` bytes even if it grows meanwhile.
    """
    from pruning.errors import UserError

    fd, info = open_regular_file(path, what=what)
    try:
        if info.st_size > limit:
            raise UserError(f"{path}: {info.st_size} bytes, more than a {what} may hold ({limit} bytes)")
        chunks: list[bytes] = []
        total = 0
        while chunk := os.read(fd, min(limit + 1 - total, 16 * MiB)):
            chunks.append(chunk)
            total += len(chunk)
            if total > limit:
                raise UserError(f"{path}: grew past {limit} bytes while read; a {what} may not")
    except OSError as e:
        raise UserError(f"{path}: cannot read the {what} ({os_error_reason(e)})") from e
    finally:
        os.close(fd)
    return b"".join(chunks)


def read_text_file_bounded(path: str | os.PathLike[str], *, what: str, limit: int) -> str:
    """``read_regular_file`` decoded as UTF-8; bytes that are not UTF-8 are the user's error, named."""
    from pruning.errors import UserError

    data = read_regular_file(path, what=what, limit=limit)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: the {what} is not UTF-8 text (byte {e.start})") from e
