"""One writer per output folder: a lock file held for the life of the command.

    with exclusive(folder, "moca pretrain"):      # <folder>/.megatron_moca.lock
    with exclusive(folder, "moca eval", beside=True)   # <parent>/.<name>.megatron_moca.lock (for outputs
                                                       # that are built elsewhere and renamed onto folder)

The lock is the kernel's: flock() on the open file, released by the kernel when the process ends however
it ends (kill -9 included), so a stale lock is never an obstacle. The file also says who holds it (pid,
host, command, start time) for the one-line refusal of a second job. flock works on local file systems
and on NFS v4 / Lustre mounted with flock; where the file system refuses it (ENOLCK, EOPNOTSUPP), the
recorded pid and host decide instead: a holder on this host that is no longer running is stale and
replaced; one on another host is trusted (its file says how to remove it by hand).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
from typing import Optional

from megatron_moca.errors import UserError
from megatron_moca.ownership import LOCK as LOCK_NAME


def lock_path(folder: str, beside: bool = False) -> str:
    folder = os.path.abspath(folder)
    if beside:
        parent, name = os.path.split(folder)
        return os.path.join(parent, f".{name}{LOCK_NAME}")
    return os.path.join(folder, LOCK_NAME)


def _holder(path: str) -> dict:
    try:
        with open(path) as f:
            holder = json.load(f)
        return holder if isinstance(holder, dict) else {}
    except (OSError, ValueError):
        return {}


def _describe(holder: dict) -> str:
    if not holder:
        return "another process"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
    return f"{holder.get('command', 'another command')} (pid {holder.get('pid')} on {holder.get('host')}, since {since})"


def _alive_here(holder: dict) -> bool:
    """Whether the holder recorded in a lock file may still run (unknown hosts count as running)."""
    if holder.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(holder.get("pid", -1)), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, TypeError):
        return True
    return True


def _flock(fd: int) -> Optional[bool]:
    """True: locked; False: held by another process; None: this file system has no flock."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as e:
        if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            return None
        raise


def acquire(folder: str, command: str, beside: bool = False) -> int:
    """Take the lock of `folder` (created when missing) for this process; a UserError naming the holder
    when another job holds it. Returns the lock file's descriptor (for release())."""
    path = lock_path(folder, beside)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    for _ in range(10):  # the file may be replaced by a holder's release between open and flock
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        locked = _flock(fd)
        if locked is False or (locked is None and _holder(path) and _alive_here(_holder(path))
                               and _holder(path).get("pid") != os.getpid()):
            holder = _holder(path)
            os.close(fd)
            hint = "" if locked is False else f" (if that job is gone, delete {path})"
            raise UserError(f"{folder} is in use by {_describe(holder)}: one job writes a folder at a time; wait "
                            f"for it to end or stop it{hint}")
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            continue
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": command,
                                 "started": time.time()}).encode())
        return fd
    raise UserError(f"{path}: could not take the lock (it kept changing); is another job starting on {folder}?")


def release(folder: str, fd: int, beside: bool = False) -> None:
    """Remove the lock file (while still holding it, so no waiter ever locks a removed file) and close it."""
    path = lock_path(folder, beside)
    with contextlib.suppress(FileNotFoundError):
        if os.fstat(fd).st_ino == os.stat(path).st_ino:
            os.unlink(path)
    os.close(fd)


@contextlib.contextmanager
def exclusive(folder: str, command: str, beside: bool = False, enabled: bool = True):
    """Hold the lock of `folder` for the block (enabled=False: a no-op, e.g. on ranks other than 0). A folder
    that the lock created and that the command left empty (it was refused early) is removed again."""
    if not enabled:
        yield
        return
    created = not beside and not os.path.exists(folder)
    fd = acquire(folder, command, beside)
    try:
        yield
    finally:
        release(folder, fd, beside)
        if created:
            with contextlib.suppress(OSError):
                os.rmdir(folder)  # only when empty
