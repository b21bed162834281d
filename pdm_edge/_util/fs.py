"""Atomic file writes: a crash or power loss leaves the old file or the new one, never a torn one."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["atomic_write"]


def atomic_write(path: str | os.PathLike[str], data: bytes | str, *, mode: int = 0o644) -> Path:
    """Write ``data`` to ``path`` atomically.

    A temporary file next to ``path`` (``.{name}.tmp-{pid}``) is written, flushed and fsync'ed,
    renamed over ``path`` (``os.replace``), and the directory is fsync'ed. Parent directories
    are created.

    Args:
        path: the target file.
        data: bytes, or text (written as UTF-8).
        mode: permissions of the new file (before the umask), e.g. ``0o600`` for secrets.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        OSError: the directory or file cannot be written (the temporary file is removed).
    """
    path = Path(path)
    if isinstance(data, str):
        data = data.encode("utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode), "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return path
