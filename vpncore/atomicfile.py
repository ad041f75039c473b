"""Replacing a file so that a crash leaves the old content or the new, never a mix (DESIGN §6).

The one way vpnd and vpnclient write their files (the accounts registry, the client's state file,
the resolver file): a temporary file beside the target (mode 0600 until it is complete), flushed
to disk, renamed over the target, then the directory flushed so the rename survives a power cut.
"""

from __future__ import annotations

import os
import tempfile


def replace(path: str, data: bytes, mode: int = 0o600, owner: tuple[int, int] | None = None) -> None:
    """Make `path` a regular file holding `data` with `mode` (and `owner`, a (uid, gid)), atomically.
    An OSError leaves `path` as it was and no temporary file behind."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}-", dir=directory)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if owner is not None:
                os.fchown(fd, *owner)
            os.fchmod(fd, mode)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    sync_directory(directory)


def sync_directory(directory: str) -> None:
    """Flush a directory's entries (a rename in it) to disk."""
    dfd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
