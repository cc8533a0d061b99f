"""The workspace's KV block store (formats permeant-kv/3 to 5): immutable, content-addressed
files, each holding consecutive tokens of every full-attention layer's K/V (B of them, or a
whole number of B-token blocks compacted into one: format 5), or of every sliding layer's window.

    <workspace>/kv-blocks/<chain>-<content>.kvb

`chain` is USXF's chained block hash of the tokens up to the end of the block (docs/USXF.md 4:
the chain of B-token blocks whatever the block's own size, rooted in the model fingerprint and
B, so it names the token prefix under this model);
`content` is the xxh3-128 of the block's bytes. A block is found again by its prefix (a fork, a
shared system prompt, the unchanged history of the next turn) and is stored once; two blocks of
the same tokens whose bytes differ (computed once by decode and once by a batched prefill, which
round differently) are two blocks, so a restore always returns the exact bytes that were saved.

A block file: a 64-byte header (magic, header size, its token count L, payload bytes, chain
hash, content hash, 8 zero bytes), then the payload: for each stream (a full layer's K parts
then its V parts, layers in order), for each KV head, the L rows of that head ([L, head_dim] in
the KV dtype), C order.
Restore reads rows with preadv straight into MLX's own buffers (engine/blockload.py) and
hashes them there: no extra copy.

Writes: a temp file `.<name>.<pid>.tmp` beside the block, fsynced and renamed; the caller fsyncs
the folder (`sync`) once before it commits the manifest that names the new blocks. A save can
also stage its blocks (`stage`: the temp file written, not yet fsynced or renamed) and have them
landed later (`land`) by the workspace's flusher thread (engine/durable.py); until then their
names are `pending` here, so another save reuses them instead of writing them twice.
"""

from __future__ import annotations

import os
import re
import stat
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import xxhash

from .atomic import fsync_dir, remove_dead_temps

if TYPE_CHECKING:
    import numpy as np

MAGIC = b"PKVBLK3\0"
BLOCK_HEADER = struct.Struct("<8sIIQ16s16s8x")
HEADER_SIZE = BLOCK_HEADER.size  # 64
SUFFIX = ".kvb"
_BLOCKS_DOMAIN = b"usxf.blocks.v1\x00"  # docs/USXF.md 4: the same chain as a USXF manifest's
BLOCK_NAME = re.compile(r"[0-9a-f]{32}-[0-9a-f]{32}")
_TEMP = re.compile(r"\..+\.(\d+)\.tmp")
try:
    IOV_MAX = max(16, min(1024, os.sysconf("SC_IOV_MAX")))
except (AttributeError, OSError, ValueError):
    IOV_MAX = 512


def chain_hashes(ids: Sequence[int] | np.ndarray, fingerprint: str, block_tokens: int) -> list[bytes]:
    """USXF's chain h[i] = xxh3_128(h[i-1] || ids of block i as uint32 LE), for the full blocks
    only (a partial last block is never a block file: it lives in the manifest's tail)."""
    import numpy as np

    raw = np.asarray(ids, dtype="<u4").tobytes()
    parent = xxhash.xxh3_128_digest(_BLOCKS_DOMAIN + fingerprint.encode("ascii")
                                    + struct.pack("<I", block_tokens))
    step = 4 * block_tokens
    out = []
    for i in range(0, (len(raw) // step) * step, step):
        parent = xxhash.xxh3_128_digest(parent + raw[i:i + step])
        out.append(parent)
    return out


def content_hash(rows: Iterable) -> bytes:
    h = xxhash.xxh3_128()
    for r in rows:
        h.update(r)
    return h.digest()


def block_name(chain: bytes, content: bytes) -> str:
    return f"{chain.hex()}-{content.hex()}"


def block_rows(streams: list, a: int, b: int) -> list:
    """The payload of the block of positions [a, b) as C-contiguous row groups of numpy arrays
    [1, heads, L, dim]: for each stream, for each KV head, its [b - a, dim] rows (views, no
    copy, when the rows are contiguous in the stream; a cache can hold a transposed view, e.g.
    after one whole-buffer update, and its rows are then copied)."""
    import numpy as np

    return [np.ascontiguousarray(s[0, h, a:b]) for s in streams for h in range(s.shape[1])]


def _chunks(bufs: list, n: int = IOV_MAX):
    for i in range(0, len(bufs), n):
        yield bufs[i:i + n]


@dataclass
class Staged:
    """A block written to its temp file, not yet durable: `land` fsyncs and renames it."""

    name: str
    fd: int
    tmp: Path
    final: Path
    nbytes: int


class BlockStore:
    """One folder of block files. One writer per workspace (engine/lock.py), so a block being
    collected is never one a concurrent save is about to name."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._prefix = os.path.join(str(self.folder), "")
        self.pending: set[str] = set()  # staged in this process, not yet landed

    def path(self, name: str) -> Path:
        return self.folder / f"{name}{SUFFIX}"

    def has(self, name: str) -> bool:
        # a plain string path: a save asks this of every block of the agent (64 at 4k tokens)
        try:
            return stat.S_ISREG(os.stat(self._prefix + name + SUFFIX).st_mode)
        except OSError:
            return False

    # ---- writing ---------------------------------------------------------------------------
    def write(self, name: str, block_tokens: int, rows: list) -> int:
        """Write one block (rows: C-contiguous arrays, the payload in order) durably under its
        name. Returns the bytes written. The folder is fsynced by `sync`."""
        staged = self.stage(name, block_tokens, rows)
        self.land(staged)
        return staged.nbytes

    def stage(self, name: str, block_tokens: int, rows: list) -> Staged:
        """Write one block to its temp file (not fsynced, not renamed); `land` finishes it, or
        `discard` removes it. The name is `pending` until then."""
        chain, content = bytes.fromhex(name[:32]), bytes.fromhex(name[33:])
        payload = sum(int(r.nbytes) for r in rows)
        self.folder.mkdir(parents=True, exist_ok=True)
        final = self.path(name)
        tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            bufs = [BLOCK_HEADER.pack(MAGIC, HEADER_SIZE, block_tokens, payload, chain, content), *rows]
            want = HEADER_SIZE + payload
            done = 0
            for group in _chunks(bufs):
                done += _write_all(fd, group)
            if done != want:
                raise OSError(f"short write: {done} of {want} bytes")
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        self.pending.add(name)
        return Staged(name, fd, tmp, final, want)

    def land(self, staged: Staged) -> None:
        """Make a staged block durable under its name: fsync, close, rename (the folder is
        fsynced by `sync`). On failure the temp file is removed and the error raised."""
        try:
            try:
                os.fsync(staged.fd)
            finally:
                os.close(staged.fd)
                staged.fd = -1
            os.replace(staged.tmp, staged.final)
        except BaseException:
            staged.tmp.unlink(missing_ok=True)
            raise
        finally:
            self.pending.discard(staged.name)

    def discard(self, staged: Staged) -> None:
        """Drop a staged block that will not be landed."""
        if staged.fd >= 0:
            os.close(staged.fd)
            staged.fd = -1
        staged.tmp.unlink(missing_ok=True)
        self.pending.discard(staged.name)

    def write_all(self, rows_of: Callable[[int], list], chain: list[bytes], spans: list[int],
                  known: tuple = (), clean: int = 0,
                  staged: list[Staged] | None = None) -> tuple[list[str], int, int]:
        """Name block j (`spans[j]` tokens, ending where `chain[j]`, the chain hash there, ends;
        its payload: `rows_of(j)`, C-contiguous arrays in order) for every j, and write those
        the store lacks; `known[j]` is taken without reading the rows when it chains the same
        prefix, lies within the first `clean` positions and is in the store. Fsyncs the folder
        when it wrote any. With `staged`, new blocks are only staged (appended there) for the
        caller to land, and a block another save staged counts as present.
        -> (names, bytes written, blocks written)."""
        names, written, new = [], 0, 0
        # a synchronous save commits its manifest now: only landed blocks count for it
        pending = self.pending if staged is not None else set()
        end = 0
        for j, h in enumerate(chain):
            end += spans[j]
            old = known[j] if j < len(known) and end <= clean else ""
            if isinstance(old, str) and old.startswith(h.hex()) and \
                    (old in pending or self.has(old)):
                names.append(old)
                continue
            rows = rows_of(j)
            name = block_name(h, content_hash(rows))
            if not (name in pending or self.has(name)):
                if staged is None:
                    written += self.write(name, spans[j], rows)
                else:
                    staged.append(self.stage(name, spans[j], rows))
                    written += staged[-1].nbytes
                new += 1
            names.append(name)
        if new and staged is None:
            self.sync()
        return names, written, new

    def sync(self) -> None:
        fsync_dir(self.folder)

    def size(self, name: str) -> int:
        try:
            return os.stat(self.path(name)).st_size
        except OSError:
            return 0

    # ---- collecting --------------------------------------------------------------------------
    def names(self) -> set[str]:
        try:
            return {p.name[:-len(SUFFIX)] for p in self.folder.iterdir()
                    if p.name.endswith(SUFFIX) and BLOCK_NAME.fullmatch(p.name[:-len(SUFFIX)])}
        except OSError:
            return set()

    def collect(self, referenced: set[str]) -> list[str]:
        """Delete every block no manifest references, and dead writers' temp files. The caller
        passes the union over every manifest of the workspace (and must not call this when one
        of them could not be read). Returns the deleted names."""
        removed = []
        for name in sorted(self.names() - referenced):
            try:
                self.path(name).unlink()
                removed.append(name)
            except OSError:
                pass
        remove_dead_temps(self.folder, _TEMP, keep_own=True)
        if removed:
            fsync_dir(self.folder)
        return removed


def _write_all(fd: int, bufs: list) -> int:
    done = 0
    views = [memoryview(b).cast("B") for b in bufs]
    while views:
        n = os.writev(fd, views)
        done += n
        while views and n >= len(views[0]):
            n -= len(views[0])
            views.pop(0)
        if views and n:
            views[0] = views[0][n:]
    return done
