"""Writing a file so that readers see the old one or the new one, never half of it.

    with atomic_write(path) as f:      # a binary file object: tarfile, torch.save, json ...
        f.write(...)
    atomic_write_bytes(path, data)     # the same for bytes already in memory

The file is written to a temporary name in the same folder, flushed and fsynced, renamed over
``path`` with os.replace, and the folder is fsynced so that the rename survives a crash. If the
write fails, the temporary file is removed and ``path`` keeps what it held. The temporary file is
created with open(), so the result has the usual mode (0666 less the umask), like any other file.

The default temporary name is ``.<name>.tmp-<pid>``: hidden, and private to each process. A caller
that wants a temporary file from a killed run overwritten by the next one passes a fixed ``temp``.

Standard library only: both ``data`` and ``densenet`` use it, and importing it imports no torch.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator, Optional, Union

PathLike = Union[str, os.PathLike]


def default_temp(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return  # some filesystems do not allow opening directories; the rename is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_write(path: PathLike, *, temp: Optional[PathLike] = None) -> Iterator[BinaryIO]:
    """A binary file that replaces ``path`` when the block ends without an exception."""
    path = Path(path)
    tmp = Path(temp) if temp is not None else default_temp(path)
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: PathLike, data: bytes, *, temp: Optional[PathLike] = None) -> None:
    with atomic_write(path, temp=temp) as f:
        f.write(data)
