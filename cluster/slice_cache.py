"""The worker's on-disk slice cache: one GGUF file per slice, named by the manifest digest.

    cache = SliceCache("/var/cache/dllama-node/slices", max_bytes=8 << 30)
    path = cache.lookup(manifest)                 # a complete, checked slice file, or None
    if path is None:
        with cache.writer(manifest, progress) as w:
            for name, offset, data in chunks:     # from the root (slices.iter_chunks)
                w.write(name, offset, data)
            path = w.finish()
    model = open_slice(path)                      # ModelFile-like; slices.slice_weights(model)

A slice file (slice_file.py) is a GGUF file holding the slice's tensors as loaded and
its manifest. A writer lays the file out in a hidden temp file in the cache directory (".<digest>.<pid>.<n>.partial",
disk space reserved up front), writes chunks where they belong in any order, checks
each tensor's blake2b digest as soon as its bytes are complete, and renames the file
into place only when every tensor is there and checked. An interrupted transfer
leaves no file under the slice's name; temp files of dead processes are removed when
a cache is opened. Least recently used slices (by mtime, touched on lookup) are
evicted to stay under max_bytes.
"""
from __future__ import annotations

import bisect
import errno
import itertools
import logging
import os
import shutil
import time
from typing import Callable, Dict, List, Optional, Tuple

from dllama_node.cluster.slice_file import (SliceFile, hash_region, lay_out, open_slice,
                                            read_slice_header)

__all__ = ["SliceCache", "SliceWriter", "SliceFile", "open_slice"]
from dllama_node.cluster.slices import SliceManifest, SliceTensor, is_digest, new_hasher
from dllama_node.common.errors import ClusterError, ModelFileError, ProtocolError, UsageError
from dllama_node.common.units import format_bytes

log = logging.getLogger(__name__)

SLICE_SUFFIX = ".gguf"
PARTIAL_SUFFIX = ".partial"
_writer_ids = itertools.count()

Progress = Optional[Callable[[int, int], None]]


# -- the cache --------------------------------------------------------------------------

class SliceCache:
    """Slice files in one directory (created if missing), least recently used evicted
    beyond max_bytes (None: no limit)."""

    def __init__(self, directory: str, max_bytes: Optional[int] = None):
        self.directory = os.path.abspath(os.fspath(directory))
        if max_bytes is not None and int(max_bytes) < 0:
            raise UsageError(f"slice cache max_bytes is {max_bytes}, expected 0 or more")
        self.max_bytes = None if max_bytes is None else int(max_bytes)
        try:
            os.makedirs(self.directory, exist_ok=True)
            probe = os.path.join(self.directory, f".probe.{os.getpid()}{PARTIAL_SUFFIX}")
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            raise UsageError(f"slice cache directory {self.directory} is not usable "
                             f"({e.strerror or e}): give a writable directory") from None
        self._remove_stale_partials()

    def path_for(self, manifest: SliceManifest) -> str:
        if not is_digest(manifest.digest):
            raise ProtocolError(f"slice manifest digest {manifest.digest[:80]!r} is not a hex digest")
        return os.path.join(self.directory, manifest.digest + SLICE_SUFFIX)

    def entries(self) -> List[Tuple[str, int, float]]:
        """(path, bytes, last used) of every slice file, least recently used first."""
        out = []
        for entry in os.scandir(self.directory):
            stem = entry.name[:-len(SLICE_SUFFIX)]
            if entry.name.endswith(SLICE_SUFFIX) and is_digest(stem) and entry.is_file():
                st = entry.stat()
                out.append((entry.path, int(st.st_size), st.st_mtime))
        out.sort(key=lambda e: e[2])
        return out

    def total_bytes(self) -> int:
        return sum(size for _, size, _ in self.entries())

    def lookup(self, manifest: SliceManifest, verify: bool = False) -> Optional[str]:
        """The path of this slice's file when it is complete and matches the manifest
        (header, tensor index, size; with verify, every tensor's digest too), else None.
        A file that does not match is removed. A hit counts as a use (LRU)."""
        path = self.path_for(manifest)
        if not os.path.exists(path):
            return None
        try:
            g, found = read_slice_header(path)
            if found.digest != manifest.digest:
                raise ModelFileError(f"{path}: holds slice {found.digest[:12]}")
            if verify:
                fd = os.open(path, os.O_RDONLY)
                try:
                    for t in manifest.tensors:
                        got = hash_region(fd, g.tensors[t.name].offset, t.nbytes)
                        if got != t.digest:
                            raise ModelFileError(f"{path}: tensor {t.name} has digest {got}, "
                                                 f"the manifest says {t.digest}")
                finally:
                    os.close(fd)
        except (ModelFileError, OSError) as e:
            log.warning("slice cache: dropping %s: %s", path, e)
            _unlink(path)
            return None
        os.utime(path)
        log.info("slice cache hit: %s (%s)", path, format_bytes(os.path.getsize(path)))
        return path

    def evict(self, need_bytes: int = 0, keep: Tuple[str, ...] = ()) -> List[str]:
        """Remove least recently used slice files until need_bytes more fit under
        max_bytes; returns the removed paths."""
        if self.max_bytes is None:
            return []
        entries = [e for e in self.entries() if e[0] not in keep]
        total = sum(size for _, size, _ in self.entries())
        removed = []
        for path, size, _ in entries:
            if total + need_bytes <= self.max_bytes:
                break
            _unlink(path)
            total -= size
            removed.append(path)
            log.info("slice cache: evicted %s (%s) to stay under %s", path, format_bytes(size),
                     format_bytes(self.max_bytes))
        return removed

    def writer(self, manifest: SliceManifest, progress: Progress = None) -> "SliceWriter":
        """A writer for this slice: its file laid out and its disk space reserved now."""
        final = self.path_for(manifest)
        tmp = os.path.join(self.directory, f".{manifest.digest}.{os.getpid()}."
                                           f"{next(_writer_ids)}{PARTIAL_SUFFIX}")
        try:
            offsets, size = lay_out(tmp, manifest)
            if self.max_bytes is not None and size > self.max_bytes:
                raise UsageError(f"slice {manifest.digest[:12]} needs {size} bytes "
                                 f"({format_bytes(size)}), the slice cache holds at most "
                                 f"{self.max_bytes} bytes ({format_bytes(self.max_bytes)})")
            self.evict(size, keep=(final,))
            fd = os.open(tmp, os.O_RDWR)
            try:
                os.posix_fallocate(fd, 0, size)
            except OSError as e:
                os.close(fd)
                if e.errno == errno.ENOSPC:
                    free = shutil.disk_usage(self.directory).free
                    raise ClusterError(f"slice cache {self.directory}: slice "
                                       f"{manifest.digest[:12]} needs {size} bytes, the disk has "
                                       f"{free} bytes free") from None
                if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                fd = os.open(tmp, os.O_RDWR)       # no fallocate on this file system
        except BaseException:
            _unlink(tmp)
            raise
        return SliceWriter(manifest, fd, tmp, final, offsets, size, self, progress)

    def _remove_stale_partials(self) -> None:
        for entry in os.scandir(self.directory):
            if not entry.name.endswith(PARTIAL_SUFFIX):
                continue
            parts = entry.name.split(".")      # "", digest, pid, n, "partial"
            try:
                pid = int(parts[2])
            except (IndexError, ValueError):
                continue
            if not _pid_alive(pid):
                log.info("slice cache: removing %s left by process %d", entry.path, pid)
                _unlink(entry.path)


class _TensorState:
    """Which bytes of one tensor have arrived, and its digest while they come in order."""

    def __init__(self, t: SliceTensor, offset: int):
        self.t = t
        self.offset = offset                  # absolute position in the file
        self.reset()

    def reset(self) -> None:
        self.starts: List[int] = []           # disjoint, sorted, merged [start, stop) ranges
        self.stops: List[int] = []
        self.hasher = new_hasher()
        self.frontier = 0                     # bytes [0, frontier) hashed; -1: rehash from file
        self.verified = False

    @property
    def received(self) -> int:
        return sum(b - a for a, b in zip(self.starts, self.stops))

    @property
    def complete(self) -> bool:
        return self.t.nbytes == 0 or (self.starts == [0] and self.stops == [self.t.nbytes])

    def add(self, start: int, stop: int, data: memoryview) -> None:
        if self.frontier == start:
            self.hasher.update(data)
            self.frontier = stop
        else:
            self.frontier = -1
        i = bisect.bisect_left(self.stops, start)          # first range that may touch
        j = bisect.bisect_right(self.starts, stop)         # ranges [i, j) overlap or touch
        if i < j:
            start, stop = min(start, self.starts[i]), max(stop, self.stops[j - 1])
        self.starts[i:j] = [start]
        self.stops[i:j] = [stop]


class SliceWriter:
    """Receives one slice's bytes: write(name, offset, data) in any order, then finish().
    A tensor whose bytes are complete is checked at once; a digest mismatch raises
    ClusterError naming it and forgets its bytes, so it can be sent again."""

    def __init__(self, manifest: SliceManifest, fd: int, tmp_path: str, final_path: str,
                 offsets: Dict[str, int], file_size: int, cache: SliceCache, progress: Progress):
        self.manifest = manifest
        self.path = final_path
        self.tmp_path = tmp_path
        self.file_size = file_size
        self.total_bytes = manifest.total_bytes
        self._fd: Optional[int] = fd
        self._cache = cache
        self._progress = progress
        self._states = {t.name: _TensorState(t, offsets[t.name]) for t in manifest.tensors}
        self._done = 0
        self._finished = False
        self._t0 = time.monotonic()
        for state in self._states.values():
            if state.complete:
                self._check(state)

    @property
    def done_bytes(self) -> int:
        return self._done

    def missing(self) -> List[str]:
        """Tensors not yet received whole and checked, in manifest order."""
        return [n for n, s in self._states.items() if not s.verified]

    def write(self, name: str, offset: int, data) -> None:
        """Bytes [offset, offset + len(data)) of slice tensor `name`."""
        if self._fd is None:
            raise ClusterError(f"slice {self.manifest.digest[:12]}: writer is closed")
        state = self._states.get(name)
        if state is None:
            raise ProtocolError(f"slice {self.manifest.digest[:12]}: received bytes of tensor "
                                f"{name}, which the manifest does not list")
        view = memoryview(data).cast("B")
        offset, n = int(offset), len(view)
        if offset < 0 or offset + n > state.t.nbytes:
            raise ProtocolError(f"slice {self.manifest.digest[:12]}: tensor {name}: bytes "
                                f"[{offset}, {offset + n}) outside the tensor's {state.t.nbytes} bytes")
        if state.verified:
            return                            # a resend of a tensor already checked
        pos, written = state.offset + offset, 0
        while written < n:
            written += os.pwrite(self._fd, view[written:], pos + written)
        before = state.received
        state.add(offset, offset + n, view)
        self._done += state.received - before
        if state.complete:
            self._check(state)
        self._report()

    def _check(self, state: _TensorState) -> None:
        t = state.t
        if state.frontier == t.nbytes:
            got = state.hasher.hexdigest()
        else:                                 # arrived out of order: hash what is on disk
            got = hash_region(self._fd, state.offset, t.nbytes)
        if got != t.digest:
            self._done -= state.received
            state.reset()
            self._report()
            raise ClusterError(f"slice {self.manifest.digest[:12]}: tensor {t.name}: received "
                               f"bytes have digest {got}, the manifest says {t.digest}; "
                               f"refused (send it again)")
        state.verified = True

    def _report(self) -> None:
        if self._progress:
            self._progress(self._done, self.total_bytes)

    def finish(self) -> str:
        """Check that every tensor is there and checked, then move the file into place
        (fsync, atomic rename). Returns the slice file's path."""
        if self._finished:
            return self.path
        missing = self.missing()
        if missing:
            s = self._states[missing[0]]
            raise ClusterError(f"slice {self.manifest.digest[:12]}: {len(missing)} tensors "
                               f"incomplete, first {s.t.name} with {s.received} of "
                               f"{s.t.nbytes} bytes")
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = None
        os.replace(self.tmp_path, self.path)
        _fsync_dir(self._cache.directory)
        self._finished = True
        dt = time.monotonic() - self._t0
        log.info("slice cache: stored %s (%s, %d tensors) in %.2f s (%.0f MB/s)", self.path,
                 format_bytes(self.file_size), len(self._states), dt,
                 self.total_bytes / max(dt, 1e-9) / 1e6)
        self._cache.evict(0, keep=(self.path,))
        return self.path

    def abort(self) -> None:
        """Drop the temp file (nothing is left under the slice's name)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if not self._finished:
            _unlink(self.tmp_path)

    def __enter__(self) -> "SliceWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.abort()


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
