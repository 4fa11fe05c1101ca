"""Folders the project writes, recognised by a marker it writes into them: nothing else is ever deleted
or replaced.

Every command that writes a folder (eval --output, demo, data prepare / demo / standin / evalset,
convert, the run directories of pretrain / finetune, their checkpoints and releases) goes through here:

    claim(folder, command)       a new or empty folder becomes the command's (a marker is written);
                                 one already marked is taken as it is; anything else is refused
    staging(final, command)      a marked sibling folder to build `final` in (a stale one of ours is
                                 cleared, anyone else's refused)
    publish(staging, final)      staging renamed onto final; an existing final is replaced only when it
                                 is ours and holds nothing we did not write there
    staged(final, command)       all of it as one block, under the output's lock (run_lock.py); the
                                 staging folder is removed when the block fails
    remove_ours(folder)          delete a folder only when it carries our marker (else refuse)

The marker `.megatron_moca` is JSON: {"written_by": command, "entries": [top-level names] | null}.
A published folder records its top-level names, so a file a user added later is noticed (the folder is
then left alone and the command says so). Folders written by releases before the marker existed are
recognised by `legacy` (e.g. a run directory's tracker file), never by their name alone.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from typing import Callable, Iterable, Optional

from megatron_moca.errors import UserError

MARKER = ".megatron_moca"
LOCK = ".megatron_moca.lock"  # run_lock.LOCK_NAME: a folder holding only our lock file is still empty


def _entries(folder: str) -> list:
    return sorted(n for n in os.listdir(folder) if n != LOCK)


def read_marker(folder: str) -> Optional[dict]:
    """The marker of `folder` (None when it has none, or when it is not a plain file)."""
    path = os.path.join(folder, MARKER)
    if os.path.islink(path) or not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            marker = json.load(f)
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def is_ours(folder: str) -> bool:
    return os.path.isdir(folder) and not os.path.islink(folder) and read_marker(folder) is not None


def mark(folder: str, command: str, entries: Optional[Iterable[str]] = None) -> None:
    """Write the marker (atomically); entries: the folder's top-level names to record (a published folder)."""
    path = os.path.join(folder, MARKER)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"written_by": command, "entries": sorted(entries) if entries is not None else None}, f)
    os.replace(tmp, path)


def _foreign_entries(folder: str) -> list:
    """Top-level names in an owned folder that its marker does not account for (only published folders
    record their names; a claimed folder's content is the command's own)."""
    marker = read_marker(folder) or {}
    recorded = marker.get("entries")
    if recorded is None:
        return []
    return sorted(set(_entries(folder)) - set(recorded) - {MARKER})


def _describe(folder: str) -> str:
    names = _entries(folder)
    return f"{names[0]!r}" + (f" and {len(names) - 1} more" if len(names) > 1 else "")


def claim(folder: str, command: str, flag: str = "--output",
          legacy: Optional[Callable[[str], bool]] = None, create: bool = True) -> bool:
    """Make `folder` the output of `command`: created when missing, marked when empty, taken as it is when
    it carries our marker (or legacy(folder) holds: written by an earlier release of this project);
    anything else is a UserError naming it. create=False: the same checks, nothing written. Returns
    whether the folder already held our output."""
    if os.path.islink(folder) and not os.path.isdir(folder):
        raise UserError(f"{flag} {folder}: a dangling symbolic link; choose a new folder")
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise UserError(f"{flag} {folder}: exists and is not a directory; choose a new or empty folder")
    if os.path.isdir(folder) and _entries(folder):
        if is_ours(folder):
            return True
        if legacy is not None and legacy(folder):
            if create:
                mark(folder, command)
            return True
        raise UserError(f"{flag} {folder}: holds files megatron_moca did not write ({_describe(folder)}); "
                        "choose a new or empty folder - nothing in it was changed")
    if create:
        os.makedirs(folder, exist_ok=True)
        mark(folder, command)
    return False


def _not_ours(folder: str) -> Optional[str]:
    """Why `folder` (an existing directory) may not be deleted or replaced by us: "foreign" when it has no
    marker of ours, the first name in it that its marker does not account for, or None (ours alone)."""
    if not is_ours(folder):
        return "foreign"
    foreign = _foreign_entries(folder)
    return repr(foreign[0]) if foreign else None


def remove_ours(folder: str, what: str = "") -> None:
    """Delete `folder` (a symlink is never followed) if it carries our marker and nothing foreign; a missing
    one is fine; anything else is a UserError (the folder is left as it is)."""
    if not os.path.lexists(folder):
        return
    problem = _not_ours(folder)
    if problem == "foreign":
        raise UserError(f"{folder}{' (' + what + ')' if what else ''}: exists and was not written by megatron_moca; "
                        "move it away or choose another folder - it was left as it is")
    if problem:
        raise UserError(f"{folder}: holds {problem}, which megatron_moca did not write; move it away first - "
                        "the folder was left as it is")
    shutil.rmtree(folder)


def staging(final: str, command: str) -> str:
    """A fresh, marked sibling folder `.<name>.partial` to build `final` in (one name per output, so a
    rerun after a kill reuses and clears it; a folder of that name we did not write is refused)."""
    parent, name = os.path.split(os.path.abspath(final))
    os.makedirs(parent, exist_ok=True)
    path = os.path.join(parent, f".{name}.partial")
    remove_ours(path, "the staging folder of " + final)
    os.makedirs(path)
    mark(path, command)
    return path


def check_replaceable(final: str, flag: str = "--output") -> None:
    """Refuse (UserError) up front when publishing onto `final` would replace something not ours."""
    if not os.path.lexists(final):
        return
    if os.path.isdir(final) and not os.path.islink(final) and not _entries(final):
        return
    if os.path.islink(final) or not os.path.isdir(final):
        raise UserError(f"{flag} {final}: exists and is not a directory; choose a new or empty folder")
    problem = _not_ours(final)
    if problem == "foreign":
        raise UserError(f"{flag} {final}: holds files megatron_moca did not write ({_describe(final)}); choose a new "
                        "or empty folder - nothing in it was changed")
    if problem:
        raise UserError(f"{flag} {final}: holds {problem}, which megatron_moca did not write there; move it "
                        "away or choose another folder - nothing in it was changed")


def publish(staging_folder: str, final: str, flag: str = "--output") -> str:
    """Rename the staging folder onto `final`, recording its top-level names in the marker. An existing
    `final` is replaced only when it is empty or ours with nothing foreign in it (check_replaceable)."""
    command = (read_marker(staging_folder) or {}).get("written_by", "megatron_moca")
    mark(staging_folder, command, [n for n in os.listdir(staging_folder) if n != MARKER])
    check_replaceable(final, flag)
    if os.path.isdir(final):
        shutil.rmtree(final)  # empty, or ours with nothing foreign (checked above)
    os.replace(staging_folder, final)
    return final


@contextlib.contextmanager
def staged(final: str, command: str, flag: str = "--output"):
    """Build `final` in a staging folder (yielded) under the one-writer lock; published when the block
    ends, removed when it raises. A staging folder a killed run left is reused (cleared first)."""
    from megatron_moca.run_lock import exclusive

    check_replaceable(final, flag)
    with exclusive(final, command, beside=True):
        folder = staging(final, command)
        try:
            yield folder
            publish(folder, final, flag)
        finally:
            if is_ours(folder):
                shutil.rmtree(folder)
