"""Files that data tables name (images of stage-2 pairs, evaluation sets and `moca data prepare` inputs):
confined to the folder they are relative to, and read only when they are regular files of bounded size.

A table from a stranger can name `/etc/shadow`, `../../secrets`, a symbolic link out of the folder, a FIFO
that blocks the reader forever, `/dev/zero` (endless) or a 40 GB file; each is refused here with a reason,
before it is opened. Confinement compares real paths (links resolved), not the text of the path.
"""

from __future__ import annotations

import hashlib
import os
import stat
from typing import Optional

from megatron_moca.errors import UserError

MAX_IMAGE_BYTES = 64 * 2**20
"""Default bound on one image file (a 64 MiB PNG is already far beyond 1024 visual tokens)."""


class UnreadableFile(ValueError):
    """A named file that is not read: missing, not a regular file, or larger than the bound."""


def resolved_inside(root: str, name: str, base: Optional[str] = None) -> Optional[str]:
    """The real path of `name` (a path from a table, relative to `base`, default root) under `root`, symbolic
    links resolved; None when it is absolute or its real path lies outside root's real path (a '..' climb
    or a link out of the folder)."""
    if os.path.isabs(name):
        return None
    real_root = os.path.realpath(root)
    real = os.path.realpath(os.path.join(base or root, name))
    return real if os.path.commonpath([real_root, real]) == real_root else None


def confined_path(root: str, name: str, where: str, allow_outside: bool = False, setting: str = "") -> str:
    """`name` (a path from a table) under `root`, as its real path; a UserError naming `where` (file:line)
    when it is absolute or leaves root by '..' or by a symbolic link, unless allow_outside (then it is
    taken as given)."""
    if allow_outside:
        return os.path.join(root, name)
    real = resolved_inside(root, name)
    if real is None:
        hint = f" (set {setting}=true to allow paths outside it)" if setting else ""
        raise UserError(f"{where}: image path {name[:120]!r} points outside {root}{hint}")
    return real


def file_problem(path: str, max_bytes: int) -> Optional[str]:
    """Why `path` must not be read (missing, not a regular file, over max_bytes), or None."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return "missing"
    except OSError as e:
        return f"unreadable ({type(e).__name__})"
    if not stat.S_ISREG(info.st_mode):
        kind = ("a FIFO" if stat.S_ISFIFO(info.st_mode) else "a device" if stat.S_ISCHR(info.st_mode) or
                stat.S_ISBLK(info.st_mode) else "a directory" if stat.S_ISDIR(info.st_mode) else "a socket or other")
        return f"not a regular file ({kind})"
    if max_bytes and info.st_size > max_bytes:
        return f"larger than the limit ({max_bytes} bytes)"
    return None


def file_sha256(path: str) -> str:
    """The hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def checked_image_path(root: str, name: str, where: str, what: str = "image") -> str:
    """An evaluation set's image path: confined to root (confined_path), a regular file within
    MAX_IMAGE_BYTES whose header PIL reads and whose size is within the decode limit, else a UserError
    naming `where` and the problem (an evaluation set must be whole; checked before any model loads)."""
    from megatron_moca.data.image_processing import ImageProcessingConfig

    path = confined_path(root, name, where)
    problem = image_file_problem(path, MAX_IMAGE_BYTES, ImageProcessingConfig())
    if problem:
        raise UserError(f"{where}: {what} {name} under {root}: {problem}")
    return path


def read_bounded(path: str, max_bytes: int = MAX_IMAGE_BYTES) -> bytes:
    """The bytes of a regular file of at most max_bytes (checked again while reading: it may grow)."""
    problem = file_problem(path, max_bytes)
    if problem:
        raise UnreadableFile(problem)
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1 if max_bytes else -1)
    except OSError as e:
        raise UnreadableFile(f"unreadable ({type(e).__name__})") from None
    if max_bytes and len(data) > max_bytes:
        raise UnreadableFile(f"larger than the limit ({max_bytes} bytes)")
    return data


def image_file_problem(path: str, max_bytes: int, image_cfg) -> Optional[str]:
    """Why an image file cannot be used (file_problem, or a header PIL cannot read / an image over the
    decode limit), or None. Reads the header only."""
    from megatron_moca.data.image_processing import ImageError, ImageTooLarge, open_image

    problem = file_problem(path, max_bytes)
    if problem:
        return problem
    try:
        with open(path, "rb") as f, open_image(f, image_cfg):  # PIL reads as far as the header only
            pass
    except ImageTooLarge as e:
        return f"too many pixels ({e})"
    except ImageError as e:
        return f"undecodable ({str(e).replace('undecodable image ', '')})"
    except OSError as e:
        return f"unreadable ({type(e).__name__})"
    return None
