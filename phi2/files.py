"""Writing files so that nothing is lost: every checkpoint, adapter, head, log and output goes through a
temporary file beside its destination and a rename, so a reader never sees a half-written file and a crash
leaves the previous version whole."""

import contextlib
import os
from pathlib import Path

_UMASK = os.umask(0o022)  # read once, at import (umask can only be read by setting it), and put back
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path):
    """A temporary path beside `path`, renamed onto it when the block succeeds and removed if it fails."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_UMASK)  # as open() would make it: safetensors writes its files owner-only
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path, data: str | bytes):
    """Write a whole file through atomic_path."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
