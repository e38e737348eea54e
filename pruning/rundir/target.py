"""Where a run writes, and the checks that keep it from writing over anything it should not.

A run publishes into ``output.dir`` only when complete (``pruning.rundir.staging``). What a previous run may
be replaced is decided by its manifest: ``run.json`` lists every file the run wrote with its size,
and modification time (ns), so any edit, even one that keeps the size, shows (docs/reliability.md).
``overwrite: true`` may replace exactly those files, and is refused if anything else is there, a listed
file changed, or something is a symlink. These checks read only; they run before any weights load,
again under the lock, and once more just before publishing. See docs/reliability.md.
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

from pruning.errors import UserError
from pruning.storage.fs import is_mount_point, relative_path_problem

CHECKPOINT_SUBDIR = "models"
ANALYSIS_SUBDIR = "analysis"
RUN_RECORD = "run.json"
PLAN_FILE = "plan.json"
MANIFEST_KEY = "files"
# Room the staging name adds to output.dir's name (".", ".staging-", a pid, "-", 8 hex digits).
SIBLING_EXTRA = 32
_NAME_MAX = 255


def resolve_target(output_dir: str) -> Path:
    """``output.dir`` as a path; a symlink to a directory is followed once, so the link itself stays."""
    if not output_dir.strip():
        raise UserError("output.dir: must not be empty")
    if "\0" in output_dir:
        raise UserError("output.dir: must not contain a NUL character")
    target = Path(output_dir)
    if target.name in ("", ".", ".."):  # "." or "a/..": the directory's own name is needed beside it
        target = Path(os.path.abspath(target))
    if target.is_symlink():
        if not target.exists():
            raise UserError(f"output.dir {target} is a symlink to nothing ({os.readlink(target)})")
        target = Path(os.path.realpath(target))
    if len(os.fsencode(target.name)) > _NAME_MAX - SIBLING_EXTRA:
        size = len(os.fsencode(target.name))
        raise UserError(
            f"output.dir: the name {target.name[:40]}... is {size} bytes long; at most "
            f"{_NAME_MAX - SIBLING_EXTRA} (the staging directory beside it adds {SIBLING_EXTRA})"
        )
    return target


def stamp(info: os.stat_result) -> dict[str, int]:
    """What proves a file unchanged since the run wrote it, from one ``lstat`` and no read: its size and
    its modification time in ns. Any write moves the time, an editor's write-and-rename included; a copy
    that keeps times (``cp -a``, ``rsync -a``) keeps both, so a copied run can still be overwritten (an
    inode would not survive the copy). Hashing would read 140 GB on every save and overwrite of a 70B run."""
    return {"size": info.st_size, "mtime_ns": info.st_mtime_ns}


def unchanged(info: os.stat_result, recorded: dict[str, int]) -> bool:
    """The file is as the run wrote it: the same stamp, or the same size and second where the time has
    no fraction left (a copy by a tool or onto a filesystem that keeps whole seconds: ``scp -p``, tar,
    exFAT, SMB)."""
    now = stamp(info)
    if now == recorded:
        return True
    second = 10**9
    return (
        now["size"] == recorded["size"]
        and now["mtime_ns"] % second == 0
        and now["mtime_ns"] == recorded["mtime_ns"] // second * second
    )


def read_manifest(target: Path) -> dict[str, dict[str, int]] | None:
    """The files (relative path -> stamp) that the run in ``target`` wrote, from its run.json; None if
    there is no run.json. A run.json that is not a valid run record (hand-edited, an older version, not
    this tool) cannot vouch for anything: it is refused, and the user clears the directory."""
    from pruning import reports

    record_file = target / RUN_RECORD
    if not record_file.is_file() or record_file.is_symlink():
        return None
    try:
        record = reports.load(record_file)
    except (UserError, reports.ReportValidationError) as e:
        raise UserError(
            f"output.dir {target}: {RUN_RECORD} is not a valid run record, so it cannot say which files its "
            f"run wrote ({e}); refusing to overwrite: remove them yourself or choose another output.dir"
        ) from e
    if record["report_type"] != "run_record":
        raise UserError(f"output.dir {target}: {RUN_RECORD} is a {record['report_type']}, not a run record")
    return record[MANIFEST_KEY]


def _strangers(target: Path, manifest: dict[str, dict[str, int]]) -> list[str]:
    """Everything in ``target`` a manifest does not vouch for: unlisted, changed, a symlink, an odd dir."""
    listed_dirs = {str(Path(rel).parent) for rel in manifest} | {"."}
    for rel in list(listed_dirs):
        listed_dirs.update(str(p) for p in Path(rel).parents)
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(target, followlinks=False):
        base = Path(dirpath)
        for name in sorted(dirnames + filenames):
            path = base / name
            rel = str(path.relative_to(target))
            info = os.lstat(path)
            if stat.S_ISDIR(info.st_mode):
                if rel not in listed_dirs:
                    found.append(f"{rel}/ (not written by a pruning run)")
            elif stat.S_ISLNK(info.st_mode):
                found.append(f"{rel} (a symlink)")
            elif rel == RUN_RECORD:
                continue
            elif rel not in manifest:
                found.append(f"{rel} (not written by a pruning run)")
            elif not stat.S_ISREG(info.st_mode) or not unchanged(info, manifest[rel]):
                found.append(f"{rel} (changed since the run wrote it)")
    return found


def check_output_dir(target: Path, overwrite: bool, model_path: str) -> dict[str, dict[str, int]] | None:
    """Refuse what a run must not write over; return the previous run's manifest (None if empty or new).

    Reads only. Refused: an output that overlaps the source model; a non-empty directory without
    ``overwrite``; with it, anything in the directory that the previous run's manifest does not list.
    """
    model_dir = Path(model_path)
    if model_dir.exists():
        out_real, model_real = Path(os.path.realpath(target)), Path(os.path.realpath(model_dir))
        if _is_within(out_real, model_real) or _is_within(model_real, out_real):
            raise UserError(
                f"output.dir {target} and the source model {model_path} overlap; "
                "the source is never modified, choose another output.dir"
            )
    if not target.exists():
        return None
    if not target.is_dir():
        raise UserError(f"output.dir {target} exists and is not a directory")
    if is_mount_point(target):
        raise UserError(
            f"output.dir {target} is a mount point; a run is published by renaming a directory beside it, "
            f"which cannot replace a mount point: use a directory inside it, such as {target / 'run'}"
        )
    if not any(target.iterdir()):
        return None
    if not overwrite:
        raise UserError(
            f"output.dir {target} exists and is not empty; set output.overwrite: true "
            "(or --set output.overwrite=true) or choose another directory"
        )
    manifest = read_manifest(target)
    if manifest is None:
        names = sorted(p.name for p in target.iterdir())
        raise UserError(
            f"output.dir {target} holds files that are not from a pruning run ({', '.join(names[:5])}); "
            "refusing to overwrite it"
        )
    strangers = _strangers(target, manifest)
    if strangers:
        more = f" and {len(strangers) - 3} more" if len(strangers) > 3 else ""
        raise UserError(
            f"output.dir {target} holds {', '.join(strangers[:3])}{more}; overwrite replaces only what a "
            "previous run wrote, so it refuses: move that away or choose another output.dir"
        )
    return manifest


def check_writable(target: Path, needed_bytes: int | None = None) -> None:
    """The directory that will hold the staging copy is writable and has room for the estimate."""
    existing = target.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"output.dir {target}: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"output.dir {target}: {existing} is not writable")
    if needed_bytes is None:
        return
    free = shutil.disk_usage(existing).free
    if free < needed_bytes:
        raise UserError(
            f"output.dir {target}: {existing} has {free / 2**30:.2f} GiB free, the run needs about "
            f"{needed_bytes / 2**30:.2f} GiB (the previous run, if any, stays until the new one is complete)"
        )


def _is_within(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def build_manifest(directory: Path) -> dict[str, dict[str, int]]:
    """Every regular file under ``directory`` (relative path -> ``stamp``), except the run record."""
    files: dict[str, dict[str, int]] = {}
    for dirpath, _dirnames, filenames in os.walk(directory, followlinks=False):
        for name in filenames:
            path = Path(dirpath) / name
            info = os.lstat(path)
            rel = str(path.relative_to(directory))
            if stat.S_ISREG(info.st_mode) and rel != RUN_RECORD:
                problem = relative_path_problem(rel)
                if problem is not None:  # a hook wrote it; a manifest could not list it safely
                    raise UserError(f"output.dir: the run wrote a file whose name {problem}: {rel!r:.80}")
                files[rel] = stamp(info)
    return dict(sorted(files.items()))
