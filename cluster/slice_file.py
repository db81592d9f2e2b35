"""Slice files: a node's slice of the weights as one GGUF v3 file.

The file holds the model's llama.* config keys (no tokenizer: the root tokenizes),
dllama.slice.* keys with the spec's half-open ranges [start, stop), the model's
identity, the manifest digest and the whole manifest as JSON, and the slice tensors
under their canonical names, each as loaded (kernel type; cut rows packed back to back;
norms float32). open_slice maps it read-only and hands out zero-copy views through the
same ModelFile interface the loader uses; it holds no token_embd.weight.
"""
from __future__ import annotations

import logging
import os
from typing import Dict, List, Optional, Tuple

from dllama_node.cluster.slices import SliceManifest, new_hasher
from dllama_node.common.errors import ClusterError, ModelFileError, ProtocolError
from dllama_node.model.gguf import ValueType, read_gguf
from dllama_node.model.gguf_writer import GGUFWriter
from dllama_node.model.loader import ModelFile, TensorInfo

log = logging.getLogger(__name__)

MANIFEST_KEY = "dllama.slice.manifest"
DIGEST_KEY = "dllama.slice.digest"
_READ_BYTES = 4 << 20


def slice_metadata(manifest: SliceManifest) -> List[Tuple[str, object, ValueType, Optional[ValueType]]]:
    """(key, value, type, element type) of a slice file's metadata."""
    c, s = manifest.config, manifest.spec
    u32, u64, f32, string = ValueType.UINT32, ValueType.UINT64, ValueType.FLOAT32, ValueType.STRING
    md = [("general.architecture", "llama", string, None),
          ("general.name", f"{manifest.model_name} slice {manifest.digest[:12]}", string, None),
          ("llama.vocab_size", c.vocab_size, u32, None),
          ("llama.context_length", c.seq_len, u32, None),
          ("llama.embedding_length", c.dim, u32, None),
          ("llama.block_count", c.n_layers, u32, None),
          ("llama.feed_forward_length", c.hidden_dim, u32, None),
          ("llama.rope.dimension_count", c.head_dim, u32, None),
          ("llama.attention.head_count", c.n_heads, u32, None),
          ("llama.attention.head_count_kv", c.n_kv_heads, u32, None),
          ("llama.attention.key_length", c.head_dim, u32, None),
          ("llama.attention.value_length", c.head_dim, u32, None),
          ("llama.attention.layer_norm_rms_epsilon", c.norm_eps, f32, None),
          ("llama.rope.freq_base", c.rope_theta, f32, None)]
    if c.rope_scaling is not None:
        r = c.rope_scaling
        md += [("llama.rope.scaling.type", "llama3", string, None),
               ("llama.rope.scaling.factor", r.factor, f32, None),
               ("llama.rope.scaling.low_freq_factor", r.low_freq_factor, f32, None),
               ("llama.rope.scaling.high_freq_factor", r.high_freq_factor, f32, None),
               ("llama.rope.scaling.original_context_length", r.original_max_position, u32, None)]
    for key, units in s.to_dict().items():
        md.append((f"dllama.slice.{key}", units, ValueType.ARRAY, u64))
    md += [("dllama.slice.tied_embeddings", bool(c.tied_embeddings), ValueType.BOOL, None),
           ("dllama.slice.model_identity", manifest.model_identity, string, None),
           (DIGEST_KEY, manifest.digest, string, None),
           (MANIFEST_KEY, manifest.to_json(), string, None)]
    return md


def lay_out(path: str, manifest: SliceManifest) -> Tuple[Dict[str, int], int]:
    """Write the header of the slice file at `path`, its tensor data left as a hole.
    Returns ({tensor name: absolute data offset}, file size)."""
    with GGUFWriter(path) as w:
        for key, value, vtype, etype in slice_metadata(manifest):
            w.add(key, value, vtype, etype)
        for t in manifest.tensors:
            w.add_tensor_info(t.name, t.shape, t.ggml_type)
        w.write_header()
        offsets = {t.name: w.tensor_offset(t.name) for t in manifest.tensors}
        size = w.total_size
        for t in manifest.tensors:
            w.skip_tensor(t.name)
    if os.path.getsize(path) != size:      # a trailing empty tensor: the writer stops short
        os.truncate(path, size)
    return offsets, size


class SliceFile(ModelFile):
    """A slice file opened like a model file: .config (the whole model's), .tensors,
    .tensor(name), .metadata, .path, .close(), .dequantize_rows(), .rope_inv_freq(),
    plus .slice (the SliceSpec) and .manifest. Holds no token_embd.weight."""

    def __init__(self, path: str, manifest: SliceManifest, metadata, tensors, file_size: int,
                 whole_file_map: Optional[bool] = None):
        super().__init__(path, "gguf-slice", metadata, tensors, file_size, manifest.config,
                         whole_file_map)
        self.manifest = manifest
        self.slice = manifest.spec

    def __repr__(self) -> str:
        return f"<SliceFile {self.path} {self.manifest.digest[:12]} {len(self.tensors)} tensors>"


def read_slice_header(path: str):
    """(GGUFFile, SliceManifest) of a slice file, checked against each other: the embedded
    manifest's digest holds and every tensor is where and what the manifest says."""
    g = read_gguf(path)
    text = g.metadata.get(MANIFEST_KEY)
    if not isinstance(text, str):
        raise ModelFileError(f"{path}: not a slice file: metadata key {MANIFEST_KEY} is missing")
    try:
        manifest = SliceManifest.from_json(text)
    except ProtocolError as e:
        raise ModelFileError(f"{path}: {e}") from None
    if g.metadata.get(DIGEST_KEY) != manifest.digest:
        raise ModelFileError(f"{path}: {DIGEST_KEY} is {g.metadata.get(DIGEST_KEY)!r}, the "
                             f"embedded manifest's digest is {manifest.digest}")
    names = [t.name for t in manifest.tensors]
    if sorted(g.tensors) != sorted(names):
        raise ModelFileError(f"{path}: holds {len(g.tensors)} tensors, its manifest lists "
                             f"{len(names)}")
    for t in manifest.tensors:
        info = g.tensors[t.name]
        if (info.ggml_type, tuple(info.shape), info.nbytes) != (t.ggml_type, t.shape, t.nbytes):
            raise ModelFileError(
                f"tensor {t.name} in {path}: type {info.ggml_type} shape {tuple(info.shape)} "
                f"{info.nbytes} bytes, the manifest says type {t.ggml_type} shape {t.shape} "
                f"{t.nbytes} bytes")
    return g, manifest


def open_slice(path: str, whole_file_map: Optional[bool] = None) -> SliceFile:
    """Open a slice file written by a SliceWriter (memmap, zero-copy views)."""
    path = os.fspath(path)
    g, manifest = read_slice_header(path)
    tensors = {n: TensorInfo(t.name, t.ggml_type, tuple(t.shape), t.offset, t.nbytes)
               for n, t in g.tensors.items()}
    log.info("opened slice %s (%s): %d tensors, %d bytes", path, manifest.digest[:12],
             len(tensors), manifest.total_bytes)
    return SliceFile(path, manifest, g.metadata, tensors, g.file_size, whole_file_map)


def hash_region(fd: int, offset: int, nbytes: int) -> str:
    h = new_hasher()
    done = 0
    while done < nbytes:
        block = os.pread(fd, min(_READ_BYTES, nbytes - done), offset + done)
        if not block:
            raise ClusterError(f"short read at byte {offset + done} while checking a slice file")
        h.update(block)
        done += len(block)
    return h.hexdigest()
