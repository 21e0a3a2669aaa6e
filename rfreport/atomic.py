"""Writes that never leave a half-written file, and one writer at a time per output.

:func:`write_file` writes beside the target and renames over it, so an interrupted or failed
write (a full disk, `ulimit -f`, Ctrl-C, kill -9) leaves the previous file as it was, plus at most
a hidden `.NAME.*.partial` file. :func:`locked` holds an exclusive `flock` on `.NAME.lock` beside
a target for as long as a process writes it: the kernel drops the lock when the process ends,
however it ends, so a lock is never stale; the holder's host and pid are written in the file so
a second writer can name it. `flock` rather than a library (filelock): a dozen lines, and the
holder's name travels in the locked file itself. Pure Python; POSIX (fcntl).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
import stat
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from datetime import UTC, datetime
from pathlib import Path

from rfreport.errors import OutputError, reason

logger = logging.getLogger("rfreport")
PARTIAL = ".partial"      # suffix of a file being written (`.NAME.<random>.partial` beside it)
LOCK = ".lock"            # suffix of the lock file (`.NAME.lock` beside the target)
UNLOCKABLE = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)   # filesystems without flock


def write_file(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write `data` (str as UTF-8) to `path` through a temporary sibling renamed over it; return the path.

    Missing parent folders are created. On any failure the previous file stays and the temporary
    one is removed; an OSError becomes OutputError naming the file and the reason.
    """
    path = Path(path)
    target = Path(os.path.realpath(path))   # a link to a file stays a link; its target is replaced
    partial = target.with_name(f".{target.name}.{os.urandom(4).hex()}{PARTIAL}")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(partial, "xb") as handle:   # mode 0666 less the umask, like any new file
            handle.write(data.encode("utf-8") if isinstance(data, str) else data)
            handle.flush()
            os.fsync(handle.fileno())
        _keep_mode(target, partial)
        os.replace(partial, target)
    except BaseException as exc:
        with suppress(OSError):
            partial.unlink()
        if isinstance(exc, OSError):
            raise OutputError(f"{path}: cannot write ({_in_the_way(target) or reason(exc)}); {_kept(target)}") from exc
        raise
    return path


def _in_the_way(target: Path) -> str:
    """Name a file that stands where a folder above `target` should be (the cause of `File exists`), or ''."""
    blocking = next((p for p in target.parents if p.exists() and not p.is_dir()), None)
    return f"{blocking} is a file, not a folder" if blocking else ""


def _keep_mode(target: Path, partial: Path) -> None:
    """Give the new file the permissions of the file it replaces, if there is one."""
    try:
        mode = stat.S_IMODE(target.stat().st_mode)
    except FileNotFoundError:
        return
    os.chmod(partial, mode)


def _kept(target: Path) -> str:
    """Say what is left at a target whose write failed."""
    return "the previous file is unchanged" if target.is_file() else "nothing was written"


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold the exclusive lock of `path` (a file or folder, existing or not) for the block.

    Raise OutputError naming the holder (host, pid, since when) if another process holds it. The
    lock file is removed when the block ends; one left by a killed process is unlocked, so it is
    simply taken over. On a filesystem without flock the block runs unlocked, with a warning.
    """
    lock = path.parent / f".{path.name}{LOCK}"
    fd = _acquire(lock, path)
    try:
        yield
    finally:
        if fd is not None:
            with suppress(OSError):
                lock.unlink()   # while still holding it: a process that opened it since sees it is gone
            os.close(fd)        # releases the lock


def _acquire(lock: Path, path: Path) -> int | None:
    """Open and lock the lock file without waiting, write who holds it and return its descriptor.

    Retries when the file was removed by its previous holder between our open and our lock (we
    would hold a lock nobody else sees). Returns None where the filesystem cannot lock.
    """
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            raise OutputError(f"{path}: cannot create the lock file {lock.name} ({reason(exc)})") from exc
        try:
            if not _lock(fd, path):
                os.close(fd)
                return None
            if _same_file(fd, lock):
                break
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    since = datetime.now(UTC).isoformat(timespec="seconds")
    with suppress(OSError):   # who holds it is news for a waiting run only; a full disk still locks
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"host {socket.gethostname()} pid {os.getpid()} since {since}\n".encode(), 0)
    return fd


def _lock(fd: int, path: Path) -> bool:
    """Take the lock on an open lock file without waiting; False where the filesystem cannot lock."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise OutputError(f"{path}: another rfreport process ({holder(fd)}) is writing it; wait for it to "
                          "finish or choose another output") from None
    except OSError as exc:
        if exc.errno not in UNLOCKABLE:
            raise OutputError(f"{path}: cannot lock it ({reason(exc)})") from exc
        logger.warning("%s: this filesystem cannot lock files (%s); a concurrent run into it is not detected",
                       path, reason(exc))
        return False
    return True


def _same_file(fd: int, lock: Path) -> bool:
    """Tell whether an open file is still the one at `lock` (not removed or replaced since it was opened)."""
    try:
        return os.path.samestat(os.fstat(fd), os.stat(lock))
    except FileNotFoundError:
        return False


def holder(fd: int) -> str:
    """Return what the lock file says about the process holding it."""
    text = os.pread(fd, 512, 0).decode("utf-8", "replace").strip()
    return text or "just starting"
