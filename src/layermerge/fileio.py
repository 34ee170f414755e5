"""Durable file writes and advisory locks for the files layermerge writes.

- :func:`atomic_write_text` / :func:`atomic_write_bytes` write a temporary file
  in the same directory (``.NAME.tmp-XXXXXXXX``), flush and fsync it, then rename
  it over ``NAME``. A reader sees the old file or the new one, never a part of it,
  and a failed write (full disk, read-only directory, an exception) removes the
  temporary file, so it leaves neither a 0-byte ``NAME`` nor a temporary file
  behind. Only a process killed during the write can leave one; whoever writes
  ``NAME`` next under its lock removes it (:func:`remove_stale_temps`).
- :class:`FileLock` is an advisory lock (``fcntl.flock``) on ``NAME.lock``, taken
  by every writer of ``NAME``: a second writer is refused at once with
  :class:`LockError` ("another process is writing NAME (pid N)"), or waits when
  asked to. The lock belongs to an open file, so two writers in one process
  exclude each other too. The lock file holds the owner's pid and is removed
  when the lock is released; one left by a killed process is not locked (the
  kernel drops the lock with the process) and is taken over by the next writer.

Only the standard library is used; where ``fcntl`` does not exist (Windows) locks
are not taken.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import secrets
import time
import warnings
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - not on POSIX
    fcntl = None  # type: ignore[assignment]

_TEMP_RE = r"\.tmp-[0-9a-f]{8}"
# flock errors of file systems without locks (some network file systems)
_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


class LockError(RuntimeError):
    """Another writer holds the lock of a file."""

    def __init__(self, target: Path, pid: int | None) -> None:
        self.target = target
        self.pid = pid
        if pid is not None and pid == os.getpid():
            who = f"another writer in this process (pid {pid}) is writing {target}"
        else:
            shown = f"pid {pid}" if pid is not None else "pid unknown"
            who = f"another process is writing {target} ({shown})"
        super().__init__(f"{who}; wait for it to finish, or write to another file")


def lock_path(target: str | Path) -> Path:
    """The lock file of ``target``: ``NAME.lock`` next to it."""
    target = Path(target)
    return target.with_name(target.name + ".lock")


def _read_pid(path: Path) -> int | None:
    try:
        text = path.read_text(errors="replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


class FileLock:
    """An exclusive advisory lock on ``target`` (held on ``NAME.lock``).

    ``wait``: ``False`` refuses at once when another writer holds the lock,
    ``True`` waits for it, a number waits at most that many seconds. Use as a
    context manager or call :meth:`acquire` and :meth:`release`.
    """

    def __init__(self, target: str | Path, *, wait: bool | float = False) -> None:
        self.target = Path(target)
        self.path = lock_path(self.target)
        self.wait = wait
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> FileLock:
        if self._fd is not None:
            raise RuntimeError(f"the lock of {self.target} is already held by this object")
        if fcntl is None:  # pragma: no cover
            return self
        if self.wait is True:
            deadline = float("inf")
        elif self.wait is False or self.wait is None:
            deadline = 0.0
        else:
            deadline = time.monotonic() + float(self.wait)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                if time.monotonic() >= deadline:
                    raise LockError(self.target, _read_pid(self.path)) from None
                time.sleep(0.05)
                continue
            except OSError as e:
                if e.errno not in _NO_LOCKS:
                    os.close(fd)
                    raise
                warnings.warn(
                    f"the file system of {self.target} does not support locks: a second "
                    "writer of it is not detected",
                    stacklevel=2,
                )
                self._fd = fd
                return self
            except BaseException:
                os.close(fd)
                raise
            # The holder removes the lock file before releasing it: if the file we
            # locked is no longer the one at the path, the lock we got is worthless.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            try:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
            except OSError:
                pass  # the pid is only for messages
            self._fd = fd
            return self

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.path)  # while still holding it: see acquire
        os.close(fd)

    def __enter__(self) -> FileLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.release()


def _temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{secrets.token_hex(4)}")


def remove_stale_temps(path: str | Path) -> list[Path]:
    """Remove the temporary files that interrupted writes of ``path`` left behind
    (``.NAME.tmp-XXXXXXXX``, and ``NAME.tmp`` of older versions). Call it only
    while holding ``path``'s lock: another writer's temporary file looks the same."""
    path = Path(path)
    pattern = re.compile(re.escape("." + path.name) + _TEMP_RE)
    removed = []
    try:
        candidates = list(path.parent.iterdir())
    except OSError:
        return removed
    for p in candidates:
        if pattern.fullmatch(p.name) or p.name == path.name + ".tmp":
            with contextlib.suppress(OSError):
                p.unlink()
                removed.append(p)
    return removed


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Replace ``path`` by ``data`` atomically and durably (see the module docs)."""
    path = Path(path)
    tmp = _temp_path(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Replace ``path`` by ``text`` (UTF-8) atomically and durably."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def _fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (where the platform allows it)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def file_digest(path: str | Path) -> str:
    """A short hash of a file's bytes (which file a cached result was made from)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]
