"""Durable writes: a reader sees a file's old content or its new content, never a part of either, even after a kill
-9, a power cut or a full disk. Every state file the project writes (checkpoint pointers, results, summaries,
resolved configs) goes through here.

The recipe is the POSIX one: write a temporary file in the same directory, fsync it, rename it over the target
(`os.replace` is atomic within a file system), then fsync the directory so the rename itself survives a crash.
"""
import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO


def fsync_dir(path: str | Path) -> None:
    """Make the entries of directory `path` (created, renamed or removed files) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """Yields a temporary path beside `path` to write; on a clean exit it is fsynced and renamed over `path`, on an
    error it is removed and `path` is left as it was. For writers that take a path (safetensors' save_file)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write(path: str | Path, write: Callable[[BinaryIO], Any]) -> None:
    """Call `write(file)` on a temporary file, then put it in place of `path` atomically and durably."""
    with replacing(path) as tmp, open(tmp, "wb") as f:
        write(f)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def atomic_write_json(path: str | Path, value: Any) -> None:
    atomic_write_text(path, json.dumps(value, indent=2) + "\n")
