"""Restore's reader: every full layer's K/V buffers filled straight from the block files into
memory MLX allocates for them, with no zero fill and no copy.

MLX has no "empty" array, and `mx.zeros` writes every page of a 190 MB restore from user space
(first-touch page faults: most of a restore's time on a VM, issue 17). `mx.load` reading a
file object allocates the tensor and calls the object's `readinto` with the tensor's own
buffer. `_TensorFile` is such an object: a safetensors file that exists only in memory, one
tensor [1, heads, capacity, row] per stream, whose `readinto` leaves the buffers untouched.
Then each block is opened and checked, read once with one `preadv` scattering its rows into
every stream's buffer and hashed, by one of two or more reading threads, while another faults
the new buffers in ahead of the reads; then the manifest's tail. The free room after the last
token is left as it is: mlx-lm's caches never read a row before a turn writes it (a test
poisons it with NaN). The caller compares each block's content hash with the block's name.
"""

from __future__ import annotations

import ctypes
import functools
import io
import json
import mmap
import os
import stat
import sys
from concurrent.futures import wait
from typing import TYPE_CHECKING

import xxhash

from .blockstore import (
    BLOCK_HEADER,
    BLOCK_NAME,
    HEADER_SIZE,
    IOV_MAX,
    MAGIC,
    BlockStore,
    block_name,
)
from .errors import SnapshotCorrupt
from .readpool import _pool, readers, run_shared
from .snapshot_format import span_ends

if TYPE_CHECKING:
    import numpy as np

# safetensors dtype names of the numpy dtypes a K/V stream is stored in
_ST_DTYPE = {"float32": "F32", "float16": "F16", "uint16": "U16", "uint32": "U32",
             "int8": "I8", "uint8": "U8"}


class Stream:
    """One stream's tensor: its shape [1, heads, capacity, row], numpy dtype (bfloat16 as
    uint16), the manifest's tail rows [1, heads, n - cut, row] as numpy, and (a sliding layer's
    window) the head rows [1, heads, start, row] that come before the first block."""

    def __init__(self, heads: int, capacity: int, row: int, dtype: np.dtype, tail: np.ndarray,
                 head: np.ndarray | None = None):
        self.heads, self.capacity, self.row = heads, capacity, row
        import numpy as np

        self.dtype, self.tail, self.head = np.dtype(dtype), tail, head

    @property
    def nbytes(self) -> int:
        return self.heads * self.capacity * self.row * self.dtype.itemsize


def _open_block(store: BlockStore, name: str, block_tokens: int, payload: int) -> int:
    path = store.path(name)
    if not BLOCK_NAME.fullmatch(name):
        raise SnapshotCorrupt(str(path), "block", "not a block name")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise SnapshotCorrupt(str(path), "block", "missing (deleted, or the store was copied "
                              "without it)") from None
    except OSError as exc:
        raise SnapshotCorrupt(str(path), "block", f"unreadable: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SnapshotCorrupt(str(path), "block", "not a regular file")
        if st.st_size != HEADER_SIZE + payload:
            raise SnapshotCorrupt(str(path), "block", f"{st.st_size} bytes, a block of "
                                  f"{block_tokens} tokens is {HEADER_SIZE + payload}: "
                                  "truncated or not this model's")
        magic, hsize, tokens, plen, chain, content = BLOCK_HEADER.unpack(os.pread(fd, HEADER_SIZE, 0))
        if (magic, hsize, tokens, plen) != (MAGIC, HEADER_SIZE, block_tokens, payload) or \
                block_name(chain, content) != name:
            raise SnapshotCorrupt(str(path), "block", "header does not describe this block")
    except OSError as exc:
        os.close(fd)
        raise SnapshotCorrupt(str(path), "block", f"unreadable: {exc.strerror or exc}") from None
    except BaseException:
        os.close(fd)
        raise
    return fd


class _TensorFile(io.RawIOBase):
    """A safetensors file that exists only in memory: `mx.load` reads its header, then hands
    `readinto` each tensor's own freshly allocated buffer, which is left untouched. One file for
    every stream: one `mx.load` allocates them all (at 4k, 60 loads took 9.5-10.4 ms, one 5.5-6)."""

    def __init__(self, tensors: list[tuple[str, list[int], int]]) -> None:
        """`tensors`: (safetensors dtype, shape, nbytes) of tensors "0", "1", ..."""
        header, offset, self._sizes = {}, 0, {}
        for i, (dtype, shape, nbytes) in enumerate(tensors):
            header[str(i)] = {"dtype": dtype, "shape": shape,
                              "data_offsets": [offset, offset + nbytes]}
            self._sizes[offset] = nbytes
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._head = len(raw).to_bytes(8, "little") + raw
        self._size, self._pos = len(self._head) + offset, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        self._pos = {0: 0, 1: self._pos, 2: self._size}[whence] + offset
        return self._pos

    def tell(self) -> int:
        return self._pos

    def readinto(self, buf) -> int:  # type: ignore[override]
        mv = memoryview(buf).cast("B")
        if self._pos < len(self._head):
            part = self._head[self._pos:self._pos + len(mv)]
            mv[:len(part)] = part
            self._pos += len(part)
            return len(part)
        if self._sizes.get(self._pos - len(self._head)) != len(mv):
            raise OSError(f"unexpected read of {len(mv)} bytes at {self._pos}")
        self._pos += len(mv)  # the tensor's buffer, left untouched: the reads fault it in
        return len(mv)


MADV_POPULATE_WRITE = 23  # Linux 5.14+


def populate(address: int, nbytes: int) -> bool:
    """Fault in the pages of a new buffer in one call (Linux's MADV_POPULATE_WRITE) ahead of the
    reads: a read into untouched memory takes a page fault per 4 KiB page inside the copy,
    1.1-3.3x slower here for 190 MB (bench/restore_populate.py). False where the kernel or the
    platform has no such call (macOS: Metal's shared buffers; older Linux): the reads then
    fault the pages in themselves, as before."""
    span = _pages(address, nbytes)
    if span is None:
        return False
    return _libc().madvise(span[0], span[1], MADV_POPULATE_WRITE) == 0


def resident(address: int, nbytes: int) -> bool:
    """Every page of the buffer is already in memory (MLX handed back a buffer an evicted agent
    released: runtime.keep_freed_buffers). Populating it then only costs: a restore into such
    buffers took 52 ms with the populate thread against 41 ms without (4k, 11 runs each)."""
    span = _pages(address, nbytes)
    if span is None:
        return False
    vec = (ctypes.c_ubyte * (span[1] // mmap.PAGESIZE))()
    if _libc().mincore(span[0], span[1], vec) != 0:
        return False
    # bit 0 of each page's byte: resident. In C, not a Python loop over 800 pages a buffer
    # (that loop cost 11 ms a 4k restore).
    return not bytes(vec).translate(None, _ODD)


_ODD = bytes(range(1, 256, 2))


def _pages(address: int, nbytes: int) -> tuple[int, int] | None:
    """(start, length) of the whole pages inside a buffer, on Linux; None elsewhere."""
    if sys.platform != "linux" or nbytes <= 0:
        return None
    page = mmap.PAGESIZE
    start = -(-address // page) * page
    end = (address + nbytes) // page * page
    return (start, end - start) if end > start else None


@functools.cache
def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.madvise.restype = ctypes.c_int
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    libc.mincore.restype = ctypes.c_int
    return libc


class Donors:
    """K/V buffers an evicted agent released, offered to the restore that follows it
    (Workspace.enforce_residency evicts before a restore). A stream takes a buffer of its dtype,
    heads and row size whose capacity fits it, up to a quarter larger (a ring: exactly its
    window); the restore then skips MLX's allocation, which evaluates a file object's tensors
    one at a time (~100 us each here: 6 ms for SmolLM2's 60 at 4k, bench/restore_populate.py).

    A taken buffer is handed over through MLX's donation: a one-element `slice_update` whose
    input nothing else holds reuses its buffer, so the result is the restore's alone. Where
    anything still held it (a view kept elsewhere), MLX copies it instead: slower, never
    shared. Every byte of it is then written by the restore."""

    def __init__(self, arrays: list) -> None:
        self._pool: dict[tuple, list] = {}  # ((numpy dtype name, heads, row), capacity) -> arrays
        self.add(arrays)

    @property
    def arrays(self) -> list:
        """The buffers still offered."""
        return [a for group in self._pool.values() for a in group]

    def add(self, arrays: list) -> None:
        for a in arrays:
            _, heads, cap, row = (int(x) for x in a.shape)
            self._pool.setdefault(((_NP_NAME.get(str(a.dtype)), heads, row), cap), []).append(a)

    def take(self, stream: Stream, exact: bool = False):
        """The best-fitting buffer for `stream` (removed from the pool), else None."""
        want, need = (stream.dtype.name, stream.heads, stream.row), stream.capacity
        fits = [cap for kind, cap in self._pool if kind == want and (
            cap == need or (not exact and need < cap <= need + need // 4))]
        if not fits:
            return None
        key = (want, min(fits))
        group = self._pool[key]
        a = group.pop(0)
        if not group:
            del self._pool[key]
        return a

    def clear(self) -> None:
        self._pool.clear()


# a donor's MLX dtype -> the numpy dtype its stream is read as (bfloat16 as uint16)
_NP_NAME = {"mlx.core.float32": "float32", "mlx.core.float16": "float16",
            "mlx.core.bfloat16": "uint16"}


class StreamReader:
    """Allocates every stream's buffer untouched, then reads each block once, scattered
    straight into the buffers (preadv, a few MB a call), and hashes each part right after
    its read."""

    def __init__(self, streams: list[Stream], store: BlockStore, names: list[str],
                 spans: list[int], cut: int, n: int, start: int = 0, rotate: int = 0,
                 donors: Donors | None = None, ring: bool = False):
        """Block j (`names[j]` in `store`, `spans[j]` tokens) fills the `spans[j]` positions
        after `start` and the blocks before it, in every stream; the streams' heads [0, start)
        and tails [cut, n) come from the manifest; rows after n are left as they are (free
        room, never read before a turn writes it). With `rotate` (a sliding layer's ring, capacity n): position p goes to row
        (p + rotate) % n, the layout mlx-lm's RotatingKVCache keeps, so the ring is attached
        without reordering it. `donors`: buffers to read into where they fit (Donors); `ring`:
        the streams are sliding layers' rings, whose capacity is their window, never larger."""
        self.streams, self.store, self.names, self.spans = streams, store, names, list(spans)
        self.cut, self.n, self.start = cut, n, start
        self.rotate, self.donors, self.ring = rotate, donors, ring or bool(rotate)
        if rotate and any(st.capacity != n for st in streams):
            raise ValueError("a rotated stream has no free room")
        if len(self.spans) != len(names) or start + sum(self.spans) != cut:
            raise ValueError("the blocks do not cover the positions before the tail")
        self.starts = [start + e - s for s, e in zip(self.spans, span_ends(self.spans),
                                                      strict=True)]
        # bytes of one position of every stream: block j's payload is spans[j] of them
        self.token_bytes = sum(st.heads * st.row * st.dtype.itemsize for st in streams)
        self.digests: list[bytes] = []

    def _spans(self, a: int, b: int) -> list[tuple[int, int]]:
        """Rows [a, b) of a stream as the row ranges they occupy in its buffer (two when a
        rotated range wraps)."""
        if not self.rotate or a == b:
            return [(a, b)]
        p = (a + self.rotate) % self.n
        return [(p, p + b - a)] if p + b - a <= self.n else [(p, self.n), (0, p + b - a - self.n)]

    def load(self) -> list:
        """-> one MLX array [1, heads, capacity, row] per stream, filled; `digests` holds each
        block's content hash (the caller compares them with the names). SnapshotCorrupt naming
        the first block (in order) that is missing, not this snapshot's, or reads short."""
        # All at once: allocating a group of streams while another's rows are read made both
        # slower (MLX's load takes the GIL per tensor, the readers between their calls: 50 ms
        # against 34 at 4k).
        out, rows, donated = _allocate(self.streams, self.donors, exact=self.ring)
        heads = _head_views(rows)
        # Each block is opened and checked, read, then hashed, by one of `readers()` threads:
        # preadv and the hash both release the GIL, so the threads copy and hash side by side,
        # and a block is hashed while it is still in the caches (x1.3 against one thread
        # reading while another hashed the block before). The opens and checks (~15 us a
        # block) run between the reads instead of before them all.
        # The new buffers are faulted in by another thread meanwhile: one madvise per buffer
        # not in memory yet (ctypes releases the GIL); a read that reaches a page first faults
        # it in itself. A donor's buffer was in use until the eviction: not checked.
        spans = [(r.ctypes.data, r.nbytes) for r, d in zip(rows, donated, strict=True) if not d]
        ends = [(r, s) for r, s in zip(rows, self.streams, strict=True)
                if self.start > 0 or self.n > self.cut]
        pager = _pool("permeant-populate", 1)
        populating = pager.submit(_fault_in, spans) if spans else None
        jobs: list = [functools.partial(self._block, j, heads) for j in range(len(self.names))]
        jobs += [functools.partial(self._tail, r, s) for r, s in ends]
        try:
            results = run_shared(jobs, readers())
        finally:
            if populating is not None:  # never left at work on buffers freed by a failure
                wait([populating])
        self.digests = results[:len(self.names)]
        return out

    def _block(self, j: int, heads: list) -> bytes:
        """Block j's rows into their buffers -> its content hash."""
        a, tokens = self.starts[j], self.spans[j]
        spans = self._spans(a, a + tokens)
        row = heads[0][1] if heads else 0
        if all(x == row for _, x in heads):  # the usual case: the same byte ranges in every
            cuts = [(s * row, e * row) for s, e in spans]  # head (per-part offsets cost ~4 ms
            parts = [m[x:y] for m, _ in heads for x, y in cuts]  # a 4k restore)
        else:
            parts = [m[s * x:e * x] for m, x in heads for s, e in spans]
        fd = _open_block(self.store, self.names[j], tokens, tokens * self.token_bytes)
        try:
            return self._read(j, fd, parts, HEADER_SIZE)
        finally:
            os.close(fd)

    def _tail(self, r, s: Stream) -> None:
        """The manifest's head and tail rows around the blocks' positions."""
        import numpy as np

        for a, b, rows in ((0, self.start, s.head), (self.cut, self.n, s.tail)):
            if b <= a:
                continue
            if rows is None:
                raise ValueError("a stream with a head has no head rows")
            src = rows[0]  # [heads, rows, row]: copied once, into the buffer (a slice of the
            if not src.flags.c_contiguous and src.strides[-1] != src.itemsize:  # manifest's
                src = np.ascontiguousarray(src)  # tensor, contiguous within each row)
            src = src.view(np.uint8).reshape(s.heads, b - a, -1)
            done = 0
            for x, y in self._spans(a, b):
                r[:, x:y] = src[:, done:done + y - x]
                done += y - x

    def _read(self, j: int, fd: int, parts: list, pos: int) -> bytes:
        """Block j's rows at `pos` into `parts`, hashed group by group right after each read
        (a group: at most IOV_MAX parts and READ_GROUP bytes, so a large block is hashed while
        its bytes are still in the CPU's caches) -> the block's content hash. SnapshotCorrupt
        on an error or a short read."""
        h = xxhash.xxh3_128()
        try:
            for group in _groups(parts):
                want = sum(len(p) for p in group)
                n = os.preadv(fd, group, pos) if hasattr(os, "preadv") else \
                    _pread_each(fd, group, pos)
                pos += n
                if n != want:
                    raise SnapshotCorrupt(self._path(j), "block", "short read: truncated")
                for p in group:
                    h.update(p)
        except OSError as exc:
            raise SnapshotCorrupt(self._path(j), "block",
                                  f"unreadable: {exc.strerror or exc}") from None
        return h.digest()

    def _path(self, j: int) -> str:
        return str(self.store.path(self.names[j]))


READ_GROUP = 4 << 20  # bytes a preadv reads before they are hashed (a 64-token block: one)


def _groups(parts: list):
    """`parts` in runs of at most IOV_MAX parts and about READ_GROUP bytes (a part larger than
    that is a run of its own)."""
    group: list = []
    size = 0
    for p in parts:
        if group and (len(group) == IOV_MAX or size + len(p) > READ_GROUP):
            yield group
            group, size = [], 0
        group.append(p)
        size += len(p)
    if group:
        yield group


def _fault_in(spans: list[tuple[int, int]]) -> None:
    """Populate each (address, nbytes) buffer that is not in memory yet."""
    for address, nbytes in spans:
        if not resident(address, nbytes):
            populate(address, nbytes)


def _allocate(streams: list[Stream], donors: Donors | None = None,
              exact: bool = False) -> tuple[list, list, list[bool]]:
    """MLX buffers for the streams, untouched: a donor's where one fits (its capacity then the
    stream's), else new ones (one `mx.load` of a `_TensorFile`) -> (the arrays, their bytes as
    writable numpy views [heads, capacity, row bytes], which were a donor's)."""
    import mlx.core as mx
    import numpy as np

    arrays: list = [None] * len(streams)
    start, ones = mx.array([0, 0, 0, 0]), dict[object, mx.array]()
    for i, s in enumerate(streams):
        d = donors.take(s, exact) if donors is not None else None
        if d is not None:
            s.capacity = int(d.shape[2])
            one = ones.setdefault(d.dtype, mx.zeros((1, 1, 1, 1), dtype=d.dtype))
            arrays[i] = mx.slice_update(d, one, start, axes=(0, 1, 2, 3))
            d = None  # the donor's last reference: MLX donates its buffer at the eval
    new = [i for i, a in enumerate(arrays) if a is None]
    if new:
        f = _TensorFile([(_ST_DTYPE[streams[i].dtype.name],
                          [1, streams[i].heads, streams[i].capacity, streams[i].row],
                          streams[i].nbytes) for i in new])
        loaded: dict = mx.load(f, format="safetensors")  # type: ignore[arg-type,assignment]
        for k, i in enumerate(new):
            arrays[i] = loaded[str(k)]
    arrays = [a.view(mx.uint16) if a.dtype == mx.bfloat16 else a for a in arrays]
    mx.eval(arrays)
    rows = [np.array(a, copy=False).view(np.uint8).reshape(s.heads, s.capacity, -1)
            for a, s in zip(arrays, streams, strict=True)]
    if not all(r.flags.writeable and r.base is not None for r in rows):
        raise RuntimeError("an MLX buffer is not writable in place")  # never on CPU/Metal
    fresh = set(new)
    return arrays, rows, [i not in fresh for i in range(len(streams))]


def _head_views(rows: list) -> list[tuple[memoryview, int]]:
    """Per stream, per head: (that head's region of the buffer, bytes of one row), in the block
    file's order. A block's part is a memoryview slice of the region (a numpy view per part
    cost ~16 ms a restore at 4k)."""
    return [(mv[h * stride:(h + 1) * stride], row)
            for mv, n_heads, stride, row in
            ((r.data.cast("B"), r.shape[0], r.shape[1] * r.shape[2], r.shape[2]) for r in rows)
            for h in range(n_heads)]


def _pread_each(fd: int, bufs: list, pos: int) -> int:
    done = 0
    for b in bufs:
        mv = memoryview(b).cast("B")
        data = os.pread(fd, len(mv), pos + done)
        mv[:len(data)] = data
        done += len(data)
        if len(data) < len(mv):
            break
    return done
