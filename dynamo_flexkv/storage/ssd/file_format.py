"""The SSD tier's file format: one preallocated file per directory (`SsdFile`), its header and records.

File layout (one file per directory; `SsdBlockStore` in store.py stripes block slots over them):

    [0, 4096)             header: magic, format version, JSON (identity, slot_bytes, slot counts), xxh3
    [4096, data_off)      metadata table: one record per block slot of this file
    [data_off, end)       data: slot i of this file at data_off + i * slot_bytes (4 KiB aligned)

A record (format 2) is (magic, key length, flags, data xxh3-64, write sequence, global slot, parent
length, token count, key <= 64 bytes, parent key <= 64 bytes, token ids as uint32), zero padding, and
in its last 8 bytes the xxh3-64 of everything before; it counts only if that hash matches (a torn
record is an empty slot). The parent and the tokens let a restarted worker rebuild the block chains
and announce its disk tier. Records are 256 bytes, or the next power of two that holds a block's
tokens (at most 4096), so no record straddles a page.
The metadata table is kept in memory (page aligned, so it is also an O_DIRECT buffer) and its dirty
4 KiB pages are written back by `SsdFile.flush`.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import mmap
import os
import struct
import threading
from pathlib import Path
from typing import NamedTuple

import numpy as np
import xxhash

from dynamo_flexkv.storage.private_files import open_private
from dynamo_flexkv.storage.ssd.engines import FaultInjector, IoOp, run_sync

logger = logging.getLogger(__name__)

ALIGN = 4096
MAGIC = b"DFKVSSD\x00"
FORMAT_VERSION = 2
HEADER_BYTES = ALIGN
RECORD_BYTES = 256  # the smallest record; records holding tokens are larger (record_bytes_for)
MAX_KEY_BYTES = 64
RECORD_MAGIC = 0x5244564B
# magic, key_len, flags, data_hash, seq, slot, parent_len, n_tokens, key, parent (164 bytes)
_REC = struct.Struct("<IHHQQQHH64s64s")
_HAS_PARENT = 1
MAX_TOKENS_PER_BLOCK = (ALIGN - _REC.size - 8) // 4


def record_bytes_for(tokens_per_block: int) -> int:
    """Record size for blocks of `tokens_per_block` tokens: a power of two from 256 to 4096."""
    if not 0 <= tokens_per_block <= MAX_TOKENS_PER_BLOCK:
        raise ValueError(f"tokens_per_block must be 0..{MAX_TOKENS_PER_BLOCK}, got {tokens_per_block}")
    size = RECORD_BYTES
    while size < _REC.size + 4 * tokens_per_block + 8:
        size *= 2
    return size
_HDR = struct.Struct("<8sII")  # magic, format version, JSON length
xxh = xxhash.xxh3_64_intdigest
_META_GAP_PAGES = 2



class Record(NamedTuple):
    local: int  # index in this file
    slot: int  # global slot
    key: bytes
    data_hash: int
    seq: int
    parent: bytes | None
    tokens: tuple[int, ...]


def aligned_buffer(nbytes: int) -> mmap.mmap:
    return mmap.mmap(-1, max(ALIGN, nbytes))  # anonymous mappings are page aligned


def build_header(fields: dict) -> bytes:
    body = json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()
    head = _HDR.pack(MAGIC, FORMAT_VERSION, len(body)) + body
    page = head + struct.pack("<Q", xxh(head))
    if len(page) > HEADER_BYTES:
        raise ValueError(f"identity too large for the {HEADER_BYTES}-byte SSD file header")
    return page.ljust(HEADER_BYTES, b"\0")


def _header_mismatch(actual: bytes, expected: bytes) -> str | None:
    if actual == expected:
        return None
    magic, version, n = _HDR.unpack_from(actual)
    if magic != MAGIC:
        return "bad magic (not a dynamo-flexkv SSD file, or a torn header)"
    if version != FORMAT_VERSION:
        return f"format version {version} != {FORMAT_VERSION}"
    end = _HDR.size + n
    if end + 8 > HEADER_BYTES or struct.unpack_from("<Q", actual, end)[0] != xxh(actual[:end]):
        return "header checksum mismatch (corrupt header)"
    try:
        theirs = json.loads(actual[_HDR.size:end])
    except ValueError:
        return "unreadable header"
    mine = json.loads(expected[_HDR.size:_HDR.size + _HDR.unpack_from(expected)[2]])
    return f"header differs in {sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))}"


class SsdFile:
    """One preallocated file of `slots` block slots. Opening it either loads a warm cache (header
    identical to `header`) or wipes it (one log line saying why). `no_space` is set, and the file left
    empty, when preallocation hit ENOSPC/EDQUOT."""

    def __init__(self, path: Path, header: bytes, slots: int, slot_bytes: int, label: str,
                 record_bytes: int = RECORD_BYTES):
        self.path = path
        self.slots = slots
        self.record_bytes = record_bytes
        self.no_space: str | None = None
        meta_bytes = -(-slots * record_bytes // ALIGN) * ALIGN
        self.data_off = HEADER_BYTES + meta_bytes
        size = self.data_off + slots * slot_bytes
        self.direct = True
        try:  # never a link, never another user's file (see private_files.py)
            self.fd, _ = open_private(path, os.O_RDWR | os.O_DIRECT)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            self.direct = False
            self.fd, _ = open_private(path, os.O_RDWR)
            logger.warning("%s: %s refuses O_DIRECT; using buffered I/O for %s", label, path.parent, path)
        try:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise RuntimeError(f"{path} is in use by another SSD store with the same identity "
                                   "(another engine instance?); give each instance its own identity "
                                   "or directory") from None
            self.ino = os.fstat(self.fd).st_ino
            self.meta = aligned_buffer(meta_bytes)
            self.meta_view = memoryview(self.meta)[:meta_bytes]
            self.flush_lock = threading.Lock()  # orders this file's metadata writes
            self._lock = threading.Lock()  # guards the in-memory table and `dirty`
            self.dirty: set[int] = set()
            self._size = size
            self._header = header
            actual = os.fstat(self.fd).st_size
            self.mismatch: str | None  # None: a warm cache of this exact identity and layout
            if actual == 0:
                self.mismatch = "new file"
            elif actual != size:
                self.mismatch = f"file size {actual} != expected {size} (capacity or layout changed)"
            else:
                self.mismatch = _header_mismatch(self._pread(HEADER_BYTES, 0), header)
        except BaseException:
            os.close(self.fd)
            raise

    def load(self) -> None:
        """Read the metadata table of a warm file into memory."""
        assert self.mismatch is None
        self._pread_into(self.meta_view, HEADER_BYTES)

    def _pread_into(self, view: memoryview, offset: int) -> None:
        if len(view) and os.preadv(self.fd, [view], offset) != len(view):
            raise OSError(errno.EIO, f"short read at {offset}", str(self.path))

    def _pread(self, nbytes: int, offset: int) -> bytes:
        buf = aligned_buffer(nbytes)
        try:
            with memoryview(buf) as whole, whole[:nbytes] as view:
                self._pread_into(view, offset)
            return bytes(buf[:nbytes])
        finally:
            buf.close()

    def wipe(self) -> None:
        """Empty the file and preallocate it afresh; the new header is written last."""
        size, header = self._size, self._header
        self.mismatch = None
        os.ftruncate(self.fd, 0)  # drops every old block and record
        try:
            os.posix_fallocate(self.fd, 0, size)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                os.ftruncate(self.fd, 0)
                self.no_space = f"no space to preallocate {size} bytes for {self.path} ({exc})"
                return
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
            os.ftruncate(self.fd, size)  # sparse: a later ENOSPC fails that write and degrades
        buf = aligned_buffer(HEADER_BYTES)
        try:
            buf[:HEADER_BYTES] = header  # written last: a crash before this leaves "bad magic"
            with memoryview(buf) as whole, whole[:HEADER_BYTES] as view:
                os.pwritev(self.fd, [view], 0)
            os.fsync(self.fd)
        finally:
            buf.close()

    def records(self) -> list[Record]:
        """Every valid record of this file; clears the rest (in memory; flushed later)."""
        out = []
        size = self.record_bytes
        table = np.frombuffer(self.meta, dtype=np.uint8, count=self.slots * size)
        magics = table.reshape(self.slots, size)[:, :4].copy().view("<u4").ravel()
        for local in np.nonzero(magics == RECORD_MAGIC)[0].tolist():
            rec = self.meta_view[local * size:(local + 1) * size]
            _, klen, flags, dsum, seq, slot, plen, ntok, key, parent = _REC.unpack_from(rec)
            if (klen > MAX_KEY_BYTES or plen > MAX_KEY_BYTES or _REC.size + 4 * ntok > size - 8
                    or struct.unpack_from("<Q", rec, size - 8)[0] != xxh(rec[:size - 8])):
                rec[:] = bytes(size)  # torn or garbage: the slot is empty
                self.dirty.add(local * size // ALIGN)
                continue
            tokens = struct.unpack_from(f"<{ntok}I", rec, _REC.size)
            out.append(Record(local, slot, key[:klen], dsum, seq,
                              parent[:plen] if flags & _HAS_PARENT else None, tokens))
        return out

    def set_record(self, local: int, slot: int, key: bytes | None, dsum: int = 0, seq: int = 0,
                   parent: bytes | None = None, tokens: tuple[int, ...] = ()) -> None:
        """Update one record in memory (None clears it); it reaches the disk with the next flush."""
        size = self.record_bytes
        off = local * size
        if key is None:
            rec = bytes(size)
        else:
            body = (_REC.pack(RECORD_MAGIC, len(key), 0 if parent is None else _HAS_PARENT, dsum, seq,
                              slot, len(parent or b""), len(tokens), key, parent or b"")
                    + struct.pack(f"<{len(tokens)}I", *tokens)).ljust(size - 8, b"\0")
            rec = body + struct.pack("<Q", xxh(body))
        with self._lock:
            self.meta_view[off:off + size] = rec
            self.dirty.add(off // ALIGN)

    def flush(self, inject: FaultInjector | None = None) -> None:
        """Write the dirty metadata pages (coalesced); raises OSError. Flushes of one file are
        serialized, so the last to land carries the newest image of every page it wrote."""
        with self.flush_lock:
            with self._lock:
                pages = sorted(self.dirty)
                self.dirty.clear()
            try:
                i = 0
                while i < len(pages):
                    j = i
                    while j + 1 < len(pages) and pages[j + 1] - pages[j] <= _META_GAP_PAGES:
                        j += 1  # rewriting a few clean pages beats another random 4 KiB write
                    view = self.meta_view[pages[i] * ALIGN:(pages[j] + 1) * ALIGN]
                    op = IoOp(True, self.fd, str(self.path), HEADER_BYTES + pages[i] * ALIGN, [view], len(view))
                    if inject is not None:
                        inject(op)
                    run_sync(op)
                    i = j + 1
            except BaseException:
                with self._lock:
                    self.dirty.update(pages)
                raise

    def revalidate(self) -> int:
        """After a fault: raise RuntimeError unless this is still our file with our header (OSError
        if the disk fails again); mark dirty
        every metadata page the disk does not hold as last written (the next flush rewrites it from
        memory, which is what this process serves). Returns how many such pages there were."""
        if self.removed():
            raise RuntimeError(f"{self.path} (or its directory) was removed or replaced")
        why = _header_mismatch(self._pread(HEADER_BYTES, 0), self._header)
        if why is not None:
            raise RuntimeError(f"{self.path}: header changed during the fault: {why}")
        disk = aligned_buffer(len(self.meta_view))
        try:
            with memoryview(disk) as whole, whole[:len(self.meta_view)] as view:
                self._pread_into(view, HEADER_BYTES)
                with self._lock:
                    differ = np.frombuffer(view, np.uint8).reshape(-1, ALIGN) != \
                        np.frombuffer(self.meta_view, np.uint8).reshape(-1, ALIGN)
                    stale = set(np.nonzero(differ.any(axis=1))[0].tolist()) - self.dirty
                    self.dirty |= stale
                    del differ
        finally:
            disk.close()
        return len(stale)

    def removed(self) -> bool:
        """True when the file (or its directory) was deleted or replaced under us."""
        try:
            return os.stat(self.path).st_ino != self.ino
        except OSError:
            return True

    def close(self) -> None:
        try:
            os.close(self.fd)
        except OSError:
            pass
        self.meta_view.release()
        try:
            self.meta.close()
        except BufferError:  # a view is still referenced somewhere (a traceback?): GC frees it
            pass


