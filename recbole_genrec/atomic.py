"""Atomic, verified artifact files.

Every artifact is written to a temporary file beside its target and renamed, so a reader never
sees a half-written file and a failed write leaves the old file in place. Temporary files are
named ``<target>.<pid>-<random>.tmp``: two processes writing the same target never share one, and
:func:`remove_stale_temporaries` removes those left by a killed process.

Cached artifacts (text-embedding caches, stage files, resume checkpoints) are written with
``checksum=True``: a trailer ``\\n#recbole_genrec-sha256:<64 hex>\\n`` holding the sha256 of the
bytes before it is appended to the temporary file before the rename, so file and checksum appear
together. ``np.load`` and ``torch.load`` ignore the trailing bytes; :func:`verify_file` checks them
and :func:`load_verified` removes (and reports) a file that is truncated, corrupted or has no
trailer, so it is rebuilt instead of trusted.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import time
from logging import getLogger
from typing import Callable

TRAILER_MAGIC = b"\n#recbole_genrec-sha256:"
TRAILER_LEN = len(TRAILER_MAGIC) + 64 + 1
_TEMPORARY = re.compile(r"\.(\d+)-[0-9a-f]{8}\.tmp$")


class CorruptArtifactError(Exception):
    """A cached artifact whose bytes do not match the checksum written with it."""


def temporary_path(path: str) -> str:
    """A temporary name beside ``path``, unique to this process and call."""
    return f"{path}.{os.getpid()}-{secrets.token_hex(4)}.tmp"


def _sha256(path: str, limit: int | None = None) -> str:
    digest = hashlib.sha256()
    remaining = limit
    with open(path, "rb") as f:
        while remaining is None or remaining > 0:
            block = f.read(1 << 20 if remaining is None else min(1 << 20, remaining))
            if not block:
                break
            digest.update(block)
            if remaining is not None:
                remaining -= len(block)
    return digest.hexdigest()


def append_checksum(path: str) -> str:
    """Append the sha256 trailer of ``path``'s current bytes; return the hex digest."""
    hexdigest = _sha256(path)
    with open(path, "ab") as f:
        f.write(TRAILER_MAGIC + hexdigest.encode() + b"\n")
        f.flush()
        os.fsync(f.fileno())
    return hexdigest


def atomic_write(path: str, write: Callable[[str], None], checksum: bool = False) -> None:
    """Call ``write(tmp_path)`` then rename ``tmp_path`` over ``path``; clean up on failure.
    ``checksum=True`` appends the sha256 trailer (see the module docstring) before the rename."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = temporary_path(os.path.abspath(path))
    umask = os.umask(0)
    os.umask(umask)
    try:
        with open(tmp, "xb"):
            pass
        os.chmod(tmp, 0o666 & ~umask)
        write(tmp)
        if checksum:
            append_checksum(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_text(path: str, text: str) -> None:
    def write(tmp):
        with open(tmp, "w", newline="") as f:
            f.write(text)

    atomic_write(path, write)


def verify_file(path: str) -> os.stat_result:
    """Check ``path``'s sha256 trailer; return its ``stat`` or raise :class:`CorruptArtifactError`."""
    with open(path, "rb") as f:
        stat = os.fstat(f.fileno())
        size = stat.st_size
        if size < TRAILER_LEN:
            raise CorruptArtifactError(f"{size} bytes: truncated, no checksum")
        f.seek(size - TRAILER_LEN)
        trailer = f.read(TRAILER_LEN)
    if not trailer.startswith(TRAILER_MAGIC) or not trailer.endswith(b"\n"):
        raise CorruptArtifactError("no checksum trailer: truncated, or written by an older version")
    expected = trailer[len(TRAILER_MAGIC):-1].decode("ascii", "replace")
    actual = _sha256(path, size - TRAILER_LEN)
    if actual != expected:
        raise CorruptArtifactError(f"sha256 {actual[:12]}... of the payload differs from the stored {expected[:12]}...")
    return stat


def discard(path: str, reason, what: str = "artifact", stat: os.stat_result | None = None) -> None:
    """Log and remove a file that cannot be trusted (only the very file that was checked, when
    ``stat`` is given: a good copy renamed over it meanwhile by another process stays)."""
    getLogger().warning(f"{what} {path} cannot be trusted ({reason}): removed, it will be rebuilt")
    try:
        if stat is not None:
            now = os.stat(path)
            if (now.st_ino, now.st_dev) != (stat.st_ino, stat.st_dev):
                return
        os.remove(path)
    except FileNotFoundError:
        pass


def load_verified(path: str, load: Callable[[str], object], what: str = "artifact"):
    """``load(path)`` once ``path``'s checksum is verified; ``None`` when the file is missing or
    could not be trusted (then it is logged with its name and removed, for the caller to rebuild)."""
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        return None
    try:
        stat = verify_file(path)
    except FileNotFoundError:
        return None
    except CorruptArtifactError as err:
        discard(path, err, what, stat)
        return None
    return load(path)


def remove_stale_temporaries(folder: str, min_age_s: float = 600.0) -> list[str]:
    """Remove this package's temporary files in ``folder`` whose writing process is gone (killed
    mid-write) and that have not changed for ``min_age_s``; return their paths."""
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    now = time.time()
    for name in names:
        match = _TEMPORARY.search(name)
        if not match:
            continue
        path = os.path.join(folder, name)
        pid = int(match.group(1))
        try:
            if now - os.stat(path).st_mtime < min_age_s or _alive(pid):
                continue
            os.remove(path)
            removed.append(path)
        except OSError:
            continue
    if removed:
        getLogger().info(f"removed {len(removed)} temporary file(s) left by killed runs in {folder}")
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
