"""Files written whole or not at all, and data that reaches the disk before the code goes on.

Every file the app writes for later reading (run outputs, checkpoints, a node's caches) goes through
:func:`atomic_write`: the content is written to a temporary sibling, synced, and renamed over the target,
so a reader (or a resume after a crash) sees the old file or the new one, never a torn one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

PARTIAL = ".partial"


def temporary_sibling(path: Path) -> Path:
    """The name :func:`atomic_write` writes ``path``'s content under before the rename.

    It sits in the same directory (a rename is atomic only within one file system) and holds the process id, so
    that processes writing the same file at once (nodes sharing a cache directory) do not write into each other.
    """
    return path.with_name(f"{path.name}.{os.getpid()}{PARTIAL}")


def sync_file(handle: IO) -> None:
    """Flush ``handle`` and have the operating system write the file's data to the disk.

    Parameters
    ----------
    handle : IO
        An open file (text or binary) that was written to.
    """
    handle.flush()
    os.fsync(handle.fileno())


def sync_directory(folder: Path) -> None:
    """Write ``folder``'s entries (a rename, a new file) to the disk; best effort.

    Some platforms (Windows) cannot open or sync a directory: there this does nothing.
    """
    try:
        descriptor = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write a file whole or not at all.

    ``write`` writes the content to the path it is given (a temporary sibling of ``path``, see
    :func:`temporary_sibling`); the file is then synced to the disk, renamed over ``path``, and the directory
    synced, so that after a crash ``path`` holds either its old content or the new one.

    Parameters
    ----------
    path : Path
        The file to write; its directory must exist.
    write : Callable[[Path], None]
        Writes the whole content to the given path, e.g. ``lambda p: save_file(tensors, str(p))``.

    Raises
    ------
    Exception
        Whatever ``write`` (or the file system) raises; ``path`` is then untouched and the temporary
        file removed.
    """
    path = Path(path)
    partial = temporary_sibling(path)
    try:
        write(partial)
        with partial.open("rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    sync_directory(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` with :func:`atomic_write`."""
    atomic_write(path, lambda partial: partial.write_text(text, encoding="utf-8"))


def atomic_write_json(path: Path, data: Any, *, indent: int = 2) -> None:
    """Write ``data`` as JSON (indented, one final newline) to ``path`` with :func:`atomic_write`."""
    atomic_write_text(path, json.dumps(data, indent=indent) + "\n")
