"""Files and directories that appear whole or not at all.

Every writer of a file that another process (or a resume) may read goes through here: the
content is written beside the target under a name unique to this writer (same directory, so the
final `os.replace` is a rename within one filesystem, which POSIX makes atomic), then renamed
onto the target. A crash, a kill or a full disk at any moment leaves the old target or the new
one, never half of one; a failed write removes its temporary.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def fsync_dir(path: str | Path) -> None:
    """Make a rename inside `path` durable (the directory entry, not only the data)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temporary_sibling(path: str | Path) -> Path:
    """A hidden name beside `path`, unique per writer (two processes filling one cache never share one)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")


def is_temporary(name: str) -> bool:
    """Whether a file or directory name is one `temporary_sibling` gives."""
    return name.startswith(".") and name.endswith(".tmp")


def remove_stale_temporaries(path: str | Path) -> None:
    """Remove what an atomic write of `path` left beside it when it was killed mid-way. Only for a
    path that one process at a time writes (e.g. rank 0 of the run holding the run-directory lock)."""
    path = Path(path)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


@contextmanager
def atomic_path(path: str | Path, durable: bool = False) -> Iterator[Path]:
    """Yields a temporary path beside `path`; write a file or a directory there. On leaving the
    block without an exception it replaces `path` (an existing directory there is removed first);
    on an exception (KeyboardInterrupt included) the temporary is removed and `path` is untouched.
    `durable`: fsync the written file and the directory, so the new content survives a power loss."""
    path = Path(path)
    tmp = temporary_sibling(path)
    try:
        yield tmp
        if durable and tmp.is_file():
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        os.replace(tmp, path)
        if durable:
            fsync_dir(path.parent)
    except BaseException:
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str, durable: bool = False) -> Path:
    with atomic_path(path, durable=durable) as tmp:
        tmp.write_text(text)
    return Path(path)


def atomic_write_bytes(path: str | Path, data: bytes, durable: bool = False) -> Path:
    with atomic_path(path, durable=durable) as tmp:
        tmp.write_bytes(data)
    return Path(path)
