"""Atomic, versioned, checksummed checkpoint files (NumPy + stdlib only, no pickle).

File layout (all integers little-endian)::

    offset  size  field
    0       8     magic  b"SLSTMCKP"
    8       4     format version (uint32), currently 1
    12      8     header length H (uint64)
    20      H     JSON header, UTF-8, space-padded so that the data starts on a 64-byte boundary
    20+H    D     data: raw C-order bytes of each array, each one starting at a 64-byte-aligned offset
                  (relative to the data start), zero-padded in between
    20+H+D  32    SHA-256 of every byte before it

    header = {"meta": {...}, "data_length": D,
              "arrays": [{"name", "dtype" (numpy descr), "shape", "offset", "nbytes"}, ...]}

The envelope (magic, version, header length, trailing SHA-256 of everything before) is the same for
every format version, so a reader can tell "damaged file" (checksum fails) from "file written by a
newer/older streamlstm" (checksum fine, version unknown) even when it cannot parse the header.

Writes go to a temp file in the target directory, are fsync'ed, os.replace'd onto the target, and the
directory is fsync'ed: a crash at any point leaves either the old or the new complete checkpoint.
"""
from __future__ import annotations

import datetime as _dt
import errno
import hashlib
import hmac
import json
import logging
import math
import os
import secrets
import stat
import struct
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from numpy.lib import format as _npformat

__all__ = [
    "CheckpointError",
    "CheckpointCorrupt",
    "CheckpointIncompatible",
    "CheckpointStore",
    "FORMAT_VERSION",
    "MAGIC",
    "load_checkpoint",
    "quarantine",
    "save_checkpoint",
]

log = logging.getLogger(__name__)

MAGIC = b"SLSTMCKP"
FORMAT_VERSION = 1
_PREFIX = struct.Struct("<8sIQ")  # magic, version, header length
_DIGEST_SIZE = 32  # sha256
_ALIGN = 64
_READ_CHUNK = 1 << 22
# A header is metadata plus one small entry per array; anything bigger is a damaged length field.
_MAX_HEADER = 1 << 30


class CheckpointError(Exception):
    """A checkpoint could not be written, read or moved aside."""


class CheckpointCorrupt(CheckpointError):
    """The file is damaged: truncated, bad magic, bad header or checksum mismatch."""


class CheckpointIncompatible(CheckpointError):
    """The file is intact but uses a format version this code does not understand."""


# ----------------------------------------------------------------------------------------- helpers

def _align(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def _byte_view(arr: np.ndarray) -> np.ndarray:
    """Flat uint8 view of a C-contiguous array (works for 0-d, datetime, structured dtypes)."""
    if arr.nbytes == 0:
        return np.empty(0, np.uint8)
    return arr.reshape(-1).view(np.uint8)


def _json_default(obj: Any) -> Any:
    # NumPy scalars (e.g. a float32 loss) are the usual non-JSON values in model metadata.
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"checkpoint meta value of type {type(obj).__name__} is not JSON-serialisable")


def _errno_text(exc: OSError) -> str:
    name = errno.errorcode.get(exc.errno or 0, "")
    detail = exc.strerror or str(exc)
    return f"{detail} ({name})" if name else detail


def _write_all(fd: int, data) -> None:
    """os.write may write less than asked (and may be interrupted by ENOSPC mid-way): loop."""
    view = memoryview(data).cast("B")
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _fsync_dir(directory: Path) -> None:
    """Make a rename durable. Some filesystems cannot fsync a directory (EINVAL): accept that."""
    if not hasattr(os, "O_DIRECTORY"):  # pragma: no cover - not Linux
        return
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def _temp_prefix(path: Path) -> str:
    return f".{path.name}."


def _prepare_arrays(arrays: Mapping[str, Any]) -> list[tuple[str, np.ndarray, Any]]:
    prepared = []
    for name, value in arrays.items():
        if not isinstance(name, str):
            raise TypeError(f"checkpoint array names must be str, got {name!r}")
        arr = np.asarray(value)
        if arr.dtype.hasobject:
            # Object arrays hold pointers; storing them would need pickle, which we refuse to load.
            raise TypeError(f"checkpoint array {name!r} has object dtype {arr.dtype}; refused")
        descr = _npformat.dtype_to_descr(arr.dtype)
        try:
            roundtrip_ok = _npformat.descr_to_dtype(json.loads(json.dumps(descr))) == arr.dtype
        except Exception:
            roundtrip_ok = False
        if not roundtrip_ok:
            raise TypeError(f"checkpoint array {name!r}: dtype {arr.dtype} cannot be stored")
        # ascontiguousarray turns 0-d into shape (1,): keep the real shape, take the bytes only.
        prepared.append((name, np.ascontiguousarray(arr), arr.shape, descr))
    return prepared


# ----------------------------------------------------------------------------------------- save

def save_checkpoint(path, arrays: Mapping[str, Any], meta: Mapping[str, Any] | None = None) -> None:
    """Write ``arrays`` (name -> ndarray) and JSON-able ``meta`` to ``path`` atomically.

    Tuples in meta come back as lists and non-str dict keys as str (JSON rules); NaN/inf are kept.
    Bad input (object arrays, non-JSON meta) raises TypeError before anything touches the disk.
    Any OS error while writing raises CheckpointError; the previous file at ``path`` is untouched
    and no temp file is left behind.
    """
    path = Path(path)
    prepared = _prepare_arrays(arrays)

    entries = []
    offset = 0
    for name, arr, shape, descr in prepared:
        offset = _align(offset)
        entries.append({"name": name, "dtype": descr, "shape": list(shape),
                        "offset": offset, "nbytes": arr.nbytes})
        offset += arr.nbytes
    data_length = offset
    header = {"meta": dict(meta or {}), "data_length": data_length, "arrays": entries}
    try:
        header_bytes = json.dumps(header, default=_json_default, separators=(",", ":"),
                                  ensure_ascii=True).encode("ascii")
    except (TypeError, ValueError) as exc:
        raise TypeError(f"checkpoint meta is not JSON-serialisable: {exc}") from exc
    # Pad with spaces (valid trailing JSON whitespace) so the data section is 64-byte aligned.
    header_bytes += b" " * (_align(_PREFIX.size + len(header_bytes)) - _PREFIX.size - len(header_bytes))
    head = _PREFIX.pack(MAGIC, FORMAT_VERSION, len(header_bytes)) + header_bytes

    directory = path.parent
    tmp: Path | None = None
    fd = -1
    try:
        # Own O_EXCL temp file (not mkstemp) so the mode follows the umask like a normal file.
        for _ in range(100):
            tmp = directory / f"{_temp_prefix(path)}{os.getpid()}.{secrets.token_hex(4)}.tmp"
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0),
                             0o666)
                break
            except FileExistsError:
                tmp = None
        else:  # pragma: no cover - 100 random-name collisions
            raise FileExistsError(errno.EEXIST, "could not create a unique temp file", str(directory))

        hasher = hashlib.sha256(head)
        _write_all(fd, head)
        pos = 0
        for (_, arr, _, _), entry in zip(prepared, entries):
            if entry["offset"] > pos:
                pad = bytes(entry["offset"] - pos)
                hasher.update(pad)
                _write_all(fd, pad)
            if arr.nbytes:
                buf = _byte_view(arr)
                hasher.update(buf)
                _write_all(fd, buf)
            pos = entry["offset"] + arr.nbytes
        _write_all(fd, hasher.digest())
        os.fsync(fd)  # data on disk before the rename makes it visible
        os.close(fd)
        fd = -1
        os.replace(tmp, path)
        tmp = None  # now owned by `path`; nothing to clean up
        _fsync_dir(directory)
    except BaseException as exc:
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        if isinstance(exc, OSError):
            if tmp is not None:
                raise CheckpointError(f"checkpoint {path} not saved (previous one kept): "
                                      f"{_errno_text(exc)}") from exc
            # The rename happened, only its durability across a power cut is unconfirmed.
            raise CheckpointError(f"checkpoint {path} written but fsync of its directory failed: "
                                  f"{_errno_text(exc)}") from exc
        raise


# ----------------------------------------------------------------------------------------- load

def _read_exact(f, buf, what: str, path: Path) -> None:
    view = memoryview(buf).cast("B")
    while view:
        n = f.readinto(view)
        if not n:
            raise CheckpointCorrupt(f"{path}: truncated while reading {what}")
        view = view[n:]


def _hash_file_body(f, size: int) -> bytes:
    """SHA-256 of everything but the trailing digest, streamed (format-version independent)."""
    f.seek(0)
    hasher = hashlib.sha256()
    remaining = size - _DIGEST_SIZE
    while remaining > 0:
        chunk = f.read(min(_READ_CHUNK, remaining))
        if not chunk:
            break
        hasher.update(chunk)
        remaining -= len(chunk)
    return hasher.digest()


def _parse_entries(header: Any, path: Path) -> tuple[dict, int, list[tuple[str, np.dtype, tuple, int, int]]]:
    def bad(msg: str) -> CheckpointCorrupt:
        return CheckpointCorrupt(f"{path}: bad header: {msg}")

    if not isinstance(header, dict):
        raise bad("not an object")
    meta, data_length, raw = header.get("meta"), header.get("data_length"), header.get("arrays")
    if not isinstance(meta, dict):
        raise bad("meta is not an object")
    if type(data_length) is not int or data_length < 0:
        raise bad("data_length is not a non-negative integer")
    if not isinstance(raw, list):
        raise bad("arrays is not a list")
    entries = []
    seen = set()
    end = 0
    for item in raw:
        if not isinstance(item, dict):
            raise bad("array entry is not an object")
        name, descr, shape = item.get("name"), item.get("dtype"), item.get("shape")
        offset, nbytes = item.get("offset"), item.get("nbytes")
        if not isinstance(name, str) or name in seen:
            raise bad(f"missing or duplicate array name {name!r}")
        seen.add(name)
        try:
            dtype = _npformat.descr_to_dtype(descr)
        except Exception:
            raise bad(f"array {name!r} has an unreadable dtype {descr!r}") from None
        if dtype.hasobject:
            # Never materialise object arrays from file bytes (they would be raw pointers).
            raise bad(f"array {name!r} has object dtype")
        if not isinstance(shape, list) or any(type(d) is not int or d < 0 for d in shape):
            raise bad(f"array {name!r} has an invalid shape {shape!r}")
        if type(offset) is not int or type(nbytes) is not int:
            raise bad(f"array {name!r} has an invalid offset/nbytes")
        # Python ints: a damaged shape cannot overflow, and nbytes must match it exactly.
        if math.prod(shape) * dtype.itemsize != nbytes:
            raise bad(f"array {name!r}: nbytes {nbytes} does not match shape {shape} x {dtype}")
        if offset < end or offset + nbytes > data_length:
            raise bad(f"array {name!r} lies outside the data section or overlaps another")
        end = offset + nbytes
        entries.append((name, dtype, tuple(shape), offset, nbytes))
    return meta, data_length, entries


def load_checkpoint(path) -> tuple[dict[str, np.ndarray], dict]:
    """Read a checkpoint written by save_checkpoint: ``(arrays, meta)``; arrays are writable copies.

    Raises FileNotFoundError when absent, CheckpointCorrupt / CheckpointIncompatible for bad files,
    CheckpointError for other OS errors (e.g. permission denied).
    """
    path = Path(path)
    try:
        # No symlink is followed (it could point anywhere, and errors would show its bytes), and
        # nothing but a regular file is read: a FIFO would block start-up for good.
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(path, flags)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise CheckpointCorrupt(f"{path}: is a symbolic link, not a checkpoint file") from None
            raise
        with open(fd, "rb", buffering=0) as f:
            mode = os.fstat(fd).st_mode
            if not stat.S_ISREG(mode):
                raise CheckpointCorrupt(f"{path}: not a regular file")
            os.set_blocking(fd, True)
            return _load_from(f, path)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {_errno_text(exc)}") from exc


def _load_from(f, path: Path) -> tuple[dict[str, np.ndarray], dict]:
    size = os.fstat(f.fileno()).st_size
    if size < _PREFIX.size + _DIGEST_SIZE:
        raise CheckpointCorrupt(f"{path}: truncated ({size} bytes)")
    prefix = bytearray(_PREFIX.size)
    _read_exact(f, prefix, "the prefix", path)
    magic, version, header_len = _PREFIX.unpack(prefix)
    if magic != MAGIC:
        raise CheckpointCorrupt(f"{path}: not a streamlstm checkpoint (bad magic)")
    if version != FORMAT_VERSION:
        # A bit flip in the version field must read as corruption, not as "newer format".
        f.seek(size - _DIGEST_SIZE)
        stored = f.read(_DIGEST_SIZE)
        if not hmac.compare_digest(_hash_file_body(f, size), stored):
            raise CheckpointCorrupt(f"{path}: checksum mismatch (version field reads {version})")
        raise CheckpointIncompatible(
            f"{path}: checkpoint format version {version} is not supported "
            f"(this streamlstm reads version {FORMAT_VERSION})")
    if header_len > min(_MAX_HEADER, size - _PREFIX.size - _DIGEST_SIZE):
        raise CheckpointCorrupt(f"{path}: truncated or bad header length {header_len}")
    header_bytes = bytearray(header_len)
    _read_exact(f, header_bytes, "the header", path)
    try:
        header = json.loads(header_bytes.decode("ascii"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise CheckpointCorrupt(f"{path}: bad header: {exc}") from None
    meta, data_length, entries = _parse_entries(header, path)
    expected = _PREFIX.size + header_len + data_length + _DIGEST_SIZE
    if size != expected:
        # Checked before allocating anything, so a damaged shape cannot ask for absurd memory.
        raise CheckpointCorrupt(f"{path}: truncated or padded: {size} bytes, header says {expected}")

    hasher = hashlib.sha256(prefix)
    hasher.update(header_bytes)
    arrays: dict[str, np.ndarray] = {}
    pos = 0
    for name, dtype, shape, offset, nbytes in entries:
        if offset > pos:
            pad = bytearray(offset - pos)
            _read_exact(f, pad, "padding", path)
            hasher.update(pad)
        out = np.empty(shape, dtype)  # fresh, writable, owns its memory
        if nbytes:
            buf = _byte_view(out)
            _read_exact(f, buf, f"array {name!r}", path)  # straight into the array: no extra copy
            hasher.update(buf)
        arrays[name] = out
        pos = offset + nbytes
    if data_length > pos:
        tail = bytearray(data_length - pos)
        _read_exact(f, tail, "padding", path)
        hasher.update(tail)
    stored = bytearray(_DIGEST_SIZE)
    _read_exact(f, stored, "the checksum", path)
    if not hmac.compare_digest(hasher.digest(), bytes(stored)):
        raise CheckpointCorrupt(f"{path}: checksum mismatch")
    return arrays, meta


# ----------------------------------------------------------------------------------------- quarantine

def quarantine(path, now: _dt.datetime | None = None) -> Path:
    """Move a bad checkpoint aside to ``<name>.corrupt-<UTC timestamp>[-N]``; never overwrites.

    Returns the new path. Raises CheckpointError if the file cannot be moved.
    """
    path = Path(path)
    now = now or _dt.datetime.now(_dt.timezone.utc)
    stamp = now.astimezone(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    base = f"{path.name}.corrupt-{stamp}"
    try:
        for n in range(10_000):
            target = path.with_name(base if n == 0 else f"{base}-{n}")
            try:
                # link() fails with EEXIST instead of replacing: a true no-overwrite rename.
                os.link(path, target, follow_symlinks=False)  # a symlink moves, not its target
            except FileExistsError:
                continue
            except OSError as exc:
                if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK,
                                     errno.EXDEV, errno.ENOSYS):
                    raise
                # Filesystem without hard links: check-then-rename (single writer, good enough).
                if os.path.lexists(target):
                    continue
                os.rename(path, target)
            else:
                try:
                    os.unlink(path)
                except OSError:
                    os.unlink(target)
                    raise
            try:
                _fsync_dir(path.parent)
            except OSError:
                pass  # the move happened; durability of it is best effort
            return target
        raise FileExistsError(errno.EEXIST, "too many quarantined copies", base)
    except OSError as exc:
        raise CheckpointError(f"cannot move bad checkpoint {path} aside: {_errno_text(exc)}") from exc


# ----------------------------------------------------------------------------------------- store

class CheckpointStore:
    """One checkpoint file in a directory, for the daemon: save / load-or-cold-start / age."""

    def __init__(self, directory, name: str = "streamlstm.ckpt"):
        if not name or os.sep in name or name in (".", ".."):
            raise ValueError(f"checkpoint name must be a plain file name, got {name!r}")
        self.directory = Path(directory)
        self.name = name
        self.path = self.directory / name

    def save(self, arrays: Mapping[str, Any], meta: Mapping[str, Any] | None = None) -> None:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CheckpointError(
                f"cannot create checkpoint directory {self.directory}: {_errno_text(exc)}") from exc
        save_checkpoint(self.path, arrays, meta)

    def load(self) -> tuple[dict[str, np.ndarray], dict] | None:
        """The saved (arrays, meta), or None to cold-start: absent, or corrupt/incompatible
        (then moved aside and logged). Other errors (e.g. permission denied) propagate as
        CheckpointError: cold-starting there would later overwrite a good checkpoint."""
        self.remove_stale_temp_files()
        try:
            return load_checkpoint(self.path)
        except FileNotFoundError:
            return None
        except (CheckpointCorrupt, CheckpointIncompatible) as exc:
            try:
                moved = quarantine(self.path)
            except CheckpointError as qexc:
                log.error("checkpoint unusable, cold-starting: %s; and %s", exc, qexc)
            else:
                log.error("checkpoint unusable, moved to %s, cold-starting: %s", moved, exc)
            return None

    def age_seconds(self) -> float | None:
        """Seconds since the checkpoint file was last written, None when there is none."""
        try:
            mtime = os.stat(self.path).st_mtime
        except FileNotFoundError:
            return None
        return max(0.0, time.time() - mtime)

    def remove_stale_temp_files(self, max_age_s: float = 600.0, any_name: bool = False) -> list[Path]:
        """Delete temp files left by a writer that died mid-save: its pid is gone, or the file is
        older than ``max_age_s`` (containers reuse pids, e.g. pid 1, across restarts). `any_name`:
        those of every file of the directory (snapshots are named by offset), not this one's only.
        On a directory several hosts share, a live pid of another host reads as gone: only files
        older than ``max_age_s`` are removed then."""
        removed = []
        now = time.time()
        prefix = _temp_prefix(self.path)
        try:
            candidates = [p for p in self.directory.iterdir()
                          if p.name.startswith("." if any_name else prefix) and p.name.endswith(".tmp")]
        except OSError:
            return removed
        for p in candidates:
            pid_text = p.name[len(prefix):].split(".", 1)[0] if not any_name else p.name.rsplit(".", 3)[-3]
            if not pid_text.isdigit():
                continue
            try:
                fresh = now - p.stat().st_mtime < max_age_s
            except OSError:
                continue
            if fresh and (any_name or _pid_alive(int(pid_text))):
                continue  # possibly a save in progress (any_name: maybe another host's)
            try:
                p.unlink()
                removed.append(p)
            except OSError:
                pass
        return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: alive but someone else's
        return True
    return True
