"""Weights for a worker that has no model file: streamed from the root, hash-checked,
kept in the worker's slice cache so the next start streams nothing.

    worker                                  root
    NEED {"what": "manifest"}        ->
                                     <-     MANIFEST (tensor list with blake2b digests)
    (cache hit: done)
    NEED {"what": "tensors", names}  ->
                                     <-     CHUNK ... CHUNK_END
    (a tensor whose digest fails is asked for again, at most RETRIES times)
"""
from __future__ import annotations

import logging
from typing import Callable, Optional

from dllama_node.cluster.protocol import CHUNK_HEADER, Connection, Kind, ManifestText, Need
from dllama_node.cluster.slice_cache import SliceCache
from dllama_node.cluster.slices import SliceManifest, iter_chunks, slice_manifest
from dllama_node.common.errors import ClusterError, ProtocolError

log = logging.getLogger(__name__)
RETRIES = 2


def fetch_slice(conn: Connection, cache: SliceCache,
                progress: Optional[Callable[[int, int], None]] = None) -> tuple:
    """Worker side: (path of the verified slice file, bytes streamed).
    progress(bytes_written, bytes_total) while the slice streams."""
    conn.send_message(Need("manifest"))
    manifest = SliceManifest.from_json(conn.recv_message(ManifestText).manifest)
    path = cache.lookup(manifest)
    if path:
        log.info("slice %s found in the cache", manifest.digest[:12])
        return path, 0
    streamed = 0
    with cache.writer(manifest, progress) as writer:
        for attempt in range(RETRIES + 1):
            names = writer.missing()
            if not names:
                break
            conn.send_message(Need("tensors", tuple(names)))
            refused = []
            while True:
                kind, length = conn.recv_header("CHUNK")
                if kind == Kind.CHUNK_END:
                    conn.recv_bytes(length, "CHUNK_END")
                    break
                if kind != Kind.CHUNK:
                    raise ProtocolError(f"node {conn.peer}: expected CHUNK, got {kind.name}")
                data = conn.recv_bytes(length, "CHUNK")
                name_len, offset = CHUNK_HEADER.unpack_from(data)
                start = CHUNK_HEADER.size
                name = data[start:start + name_len].decode()
                try:
                    writer.write(name, offset, memoryview(data)[start + name_len:])
                except ClusterError as e:      # a digest failed: ask for it again
                    refused.append(str(e))
                streamed += length
            for reason in refused:
                log.warning("%s; asking again (try %d of %d)", reason, attempt + 1, RETRIES)
        if writer.missing():
            raise ClusterError(f"slice {manifest.digest[:12]}: tensors {writer.missing()[:3]} "
                               f"failed their digest check {RETRIES + 1} times")
        path = writer.finish()
    return path, streamed


def serve_slice(conn: Connection, model, spec, node_id: str,
                progress: Optional[Callable[[str, int, int], None]] = None) -> int:
    """Root side: answer a worker's NEEDs until it says LOADED; returns bytes streamed.
    The LOADED message itself is left for the caller to read."""
    manifest = None
    sent = 0
    while True:
        kind, length = conn.recv_header(f"NEED or LOADED from {node_id}", timeout_s=None)
        if kind != Kind.NEED:
            conn.pushback = (kind, length)
            return sent
        need = conn.read_message(Need, length)
        if need.what == "manifest":
            manifest = manifest or slice_manifest(model, spec)
            conn.send_message(ManifestText(manifest.to_json()))
        elif need.what == "tensors" and manifest is not None:
            names = list(need.names or ())
            total = sum(manifest.tensor(n).nbytes for n in names)
            done = 0
            for name, offset, data in iter_chunks(model, manifest, names):
                raw = name.encode()
                conn.send(Kind.CHUNK, CHUNK_HEADER.pack(len(raw), offset), raw, data)
                done += len(data)
                sent += len(data)
                if progress:
                    progress(node_id, done, total)
            conn.send(Kind.CHUNK_END)
        else:
            raise ProtocolError(f"node {node_id}: NEED of tensors before NEED of the manifest")
