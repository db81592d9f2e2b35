"""A node's slice of the weights as data: what it holds, the digests of those bytes, and
the bytes themselves, in the order a worker receives them.

    manifest = slice_manifest(model, spec)          # at the root: cheap header identity,
                                                    # one blake2b digest per slice tensor
    for name, offset, data in iter_chunks(model, manifest):
        writer.write(name, offset, data)            # at the worker (slice_cache.py)

A slice tensor is a cut of one model tensor: rows [r0, r1) and, for the column-sliced
matrices (attn_output over this node's query heads, ffn_down over its FFN rows),
columns [c0, c1) of every row -- the same cuts as engine.weights.NodeWeights.bind.
Its bytes are the tensor as the kernels load it (engine.load.load_weights): matrices in
their kernel type (types the kernels do not run converted, as ModelFile.tensor does),
rows packed back to back, norms as float32. The token embedding is not part of a
slice (the root embeds); a tied classifier's rows are, cut from token_embd.weight and
named output.weight in the slice.

Every size and offset is a Python int. The manifest's own digest (over its canonical
JSON) names the slice in the worker's cache: a different model file, a different
slice or a single changed weight byte gives a different name.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, List, Optional, Tuple

import numpy as np

from dllama_node.common.errors import ClusterError, ProtocolError, UsageError
from dllama_node.engine.load import anonymous_array
from dllama_node.engine.weights import LayerWeights, NodeWeights, column_slice
from dllama_node.model import quants
from dllama_node.model.config import ModelConfig, RopeScaling
from dllama_node.model.tensors import SliceSpec, TensorKind, Weight, model_tensors, tensor_table

log = logging.getLogger(__name__)

MANIFEST_FORMAT = "dllama-slice/1"
DIGEST_NAME = "blake2b-256"
DIGEST_BYTES = 32
DEFAULT_CHUNK_BYTES = 4 << 20
_HEADER_READ_BYTES = 8 << 20
_HEX_DIGEST = re.compile(r"^[0-9a-f]{64}$")

Range = Tuple[int, int]


def new_hasher():
    """The hash every digest here uses: blake2b with a 32-byte digest."""
    return hashlib.blake2b(digest_size=DIGEST_BYTES)


def is_digest(value: object) -> bool:
    """True for a lowercase hex digest of the right length (safe inside a file name)."""
    return isinstance(value, str) and bool(_HEX_DIGEST.match(value))


@dataclass(frozen=True)
class SliceTensor:
    """One tensor of a slice: a cut of `source` in the model file, as loaded."""

    name: str                     # canonical name in the slice ("output.weight" when tied)
    source: str                   # tensor in the model file it is cut from
    rows: Optional[Range]         # [r0, r1) of the source's rows; None for a vector
    cols: Optional[Range]         # [c0, c1) of each row, in values; None = whole rows
    ggml_type: int                # type as loaded (kernel type; F32 for vectors)
    shape: Tuple[int, ...]        # numpy order, in values: (rows, cols) or (n,)
    nbytes: int
    digest: str = ""              # blake2b-256 hex of exactly these bytes


@dataclass(frozen=True)
class SliceManifest:
    """What a node's slice is, where it comes from, and the digests to check it against."""

    model_identity: str           # digest of the model file's header, tensor index and size
    model_file_size: int
    model_format: str             # "gguf" or "dllama-m"
    model_name: str
    config: ModelConfig
    spec: SliceSpec
    tensors: Tuple[SliceTensor, ...]
    digest: str = ""              # digest of everything above: the cache key

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def tensor(self, name: str) -> SliceTensor:
        for t in self.tensors:
            if t.name == name:
                return t
        raise ProtocolError(f"slice {self.digest[:12]}: tensor {name} is not in the manifest")

    def _body(self) -> dict:
        cfg = dataclasses.asdict(self.config)
        return {
            "format": MANIFEST_FORMAT,
            "digest_algorithm": DIGEST_NAME,
            "model": {"identity": self.model_identity, "file_size": int(self.model_file_size),
                      "format": self.model_format, "name": self.model_name},
            "config": cfg,
            "spec": self.spec.to_dict(),
            "tensors": [{"name": t.name, "source": t.source,
                         "rows": list(t.rows) if t.rows is not None else None,
                         "cols": list(t.cols) if t.cols is not None else None,
                         "ggml_type": t.ggml_type, "shape": list(t.shape),
                         "nbytes": int(t.nbytes), "digest": t.digest}
                        for t in self.tensors],
        }

    def compute_digest(self) -> str:
        h = new_hasher()
        h.update(_canonical(self._body()))
        return h.hexdigest()

    def to_dict(self) -> dict:
        body = self._body()
        body["digest"] = self.digest
        return body

    def to_json(self) -> str:
        return _canonical(self.to_dict()).decode()

    @classmethod
    def from_dict(cls, d: dict) -> "SliceManifest":
        """Parse and check a manifest (from the wire or a slice file): its format and
        that its digest is the digest of its contents."""
        try:
            if d.get("format") != MANIFEST_FORMAT:
                raise ProtocolError(f"slice manifest format {d.get('format')!r}, expected "
                                    f"{MANIFEST_FORMAT!r}")
            cfg = dict(d["config"])
            rs = cfg.pop("rope_scaling", None)
            config = ModelConfig(**cfg, rope_scaling=RopeScaling(**rs) if rs else None)
            spec = SliceSpec.from_dict(d["spec"])
            tensors = tuple(SliceTensor(
                name=str(t["name"]), source=str(t["source"]),
                rows=tuple(int(x) for x in t["rows"]) if t["rows"] is not None else None,
                cols=tuple(int(x) for x in t["cols"]) if t["cols"] is not None else None,
                ggml_type=int(t["ggml_type"]), shape=tuple(int(x) for x in t["shape"]),
                nbytes=int(t["nbytes"]), digest=str(t["digest"])) for t in d["tensors"])
            m = d["model"]
            manifest = cls(str(m["identity"]), int(m["file_size"]), str(m["format"]),
                           str(m["name"]), config, spec, tensors, str(d["digest"]))
        except ProtocolError:
            raise
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise ProtocolError(f"slice manifest is malformed: {type(e).__name__} {e}") from None
        if not is_digest(manifest.digest):
            raise ProtocolError(f"slice manifest digest {manifest.digest[:80]!r} is not a "
                                f"{DIGEST_NAME} hex digest")
        actual = manifest.compute_digest()
        if actual != manifest.digest:
            raise ProtocolError(f"slice manifest says digest {manifest.digest}, its contents "
                                f"hash to {actual} (altered in transit?)")
        names = [t.name for t in tensors]
        if len(set(names)) != len(names):
            raise ProtocolError(f"slice manifest {manifest.digest[:12]} names a tensor twice")
        return manifest

    @classmethod
    def from_json(cls, text) -> "SliceManifest":
        try:
            d = json.loads(text)
        except ValueError as e:
            raise ProtocolError(f"slice manifest is not JSON: {e}") from None
        if not isinstance(d, dict):
            raise ProtocolError("slice manifest is not a JSON object")
        return cls.from_dict(d)


def _canonical(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


# -- identity and cuts ---------------------------------------------------------------

def model_identity(model) -> str:
    """Digest of a model file's header bytes (everything before the first tensor's data:
    a GGUF header with its tensor index, or a .m header), its tensor index and its size.
    Reads no weight bytes."""
    header_end = min((t.offset for t in model.tensors.values()), default=model.file_size)
    h = new_hasher()
    with open(model.path, "rb") as f:
        left = header_end
        while left > 0:
            block = f.read(min(left, _HEADER_READ_BYTES))
            if not block:
                raise ClusterError(f"{model.path}: short read in the header at byte "
                                   f"{header_end - left} (file changed?)")
            h.update(block)
            left -= len(block)
    index = [[t.name, int(t.ggml_type), list(t.shape), int(t.offset), int(t.nbytes)]
             for t in sorted(model.tensors.values(), key=lambda t: t.name)]
    h.update(_canonical({"file_size": int(model.file_size), "format": model.format,
                         "tensors": index}))
    return h.hexdigest()


def slice_cuts(model, spec: SliceSpec) -> List[SliceTensor]:
    """The slice's tensors (without digests), in the order they are sent and stored: the
    tensor table's order (rope_freqs if the model has it, per layer the norms and
    matrices, output_norm, the classifier rows), less what no node holds (token_embd)."""
    cfg: ModelConfig = model.config
    spec.check(cfg)
    cuts = []
    for t in model_tensors(cfg, optional=model.tensors):
        if not t.kind.in_slice:
            continue
        rows, cols = t.kind.cut_ranges(cfg, spec)
        info = model.tensors[t.source]
        if rows is None:
            n = 1
            for s in info.shape:
                n *= int(s)
            cuts.append(SliceTensor(t.name, t.source, None, None, quants.GGML_F32, (n,), 4 * n))
            continue
        n_cols = int(info.shape[1])
        if cols is not None and tuple(cols) == (0, n_cols):
            cols = None
        width = n_cols if cols is None else cols[1] - cols[0]
        kt = model.kernel_type(t.source)
        n_rows = rows[1] - rows[0]
        cuts.append(SliceTensor(t.name, t.source, tuple(rows), cols, kt, (n_rows, width),
                                n_rows * quants.row_bytes(kt, width)))
    return cuts


def cut_chunks(model, cut: SliceTensor, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[np.ndarray]:
    """The bytes of one slice tensor, in order, as contiguous uint8 arrays of whole rows
    (about chunk_bytes each, at least one row). Zero-copy views of the map where the cut
    is whole rows of a kernel type; copies for column cuts and converted types."""
    if cut.rows is None:
        arr, _ = model.tensor(cut.source)
        yield np.ascontiguousarray(arr, dtype=np.float32).reshape(-1).view(np.uint8)
        return
    r0, r1 = cut.rows
    row_out = quants.row_bytes(cut.ggml_type, cut.shape[1])
    band = max(1, int(chunk_bytes) // max(1, row_out))
    converted = cut.ggml_type != model.tensors[cut.source].ggml_type
    whole = None if converted else model.tensor(cut.source)
    for start in range(r0, r1, band):
        stop = min(r1, start + band)
        if converted:        # convert just these rows, as ModelFile.tensor(rows=) does
            w = model.tensor(cut.source, rows=(start, stop))
        else:
            w = Weight(whole.array[start:stop], whole.ggml_type)
        if cut.cols is not None:
            w = column_slice(w, *cut.cols)
        if w[1] != cut.ggml_type:
            raise ClusterError(f"tensor {cut.source}: loads as {quants.type_name(w[1])}, the "
                               f"manifest says {quants.type_name(cut.ggml_type)}")
        yield np.ascontiguousarray(w[0]).reshape(-1).view(np.uint8)


# -- manifest and chunk source ---------------------------------------------------------

def slice_manifest(model, spec: SliceSpec,
                   progress: Optional[Callable[[int, int], None]] = None) -> SliceManifest:
    """The manifest of `spec`'s slice of `model` (a ModelFile): identity, config, spec and
    a digest of every slice tensor's bytes, read from the map in chunks.
    progress(bytes_done, bytes_total)."""
    t0 = time.monotonic()
    cuts = slice_cuts(model, spec)
    total = sum(c.nbytes for c in cuts)
    done = 0
    tensors = []
    for cut in cuts:
        h = new_hasher()
        n = 0
        for chunk in cut_chunks(model, cut):
            h.update(chunk)
            n += chunk.nbytes
            done += chunk.nbytes
            if progress:
                progress(done, total)
        if n != cut.nbytes:
            raise ClusterError(f"tensor {cut.name}: read {n} bytes, the slice needs {cut.nbytes}")
        tensors.append(dataclasses.replace(cut, digest=h.hexdigest()))
    manifest = SliceManifest(model_identity(model), int(model.file_size), model.format,
                             str(model.metadata.get("general.name", "")), model.config, spec,
                             tuple(tensors))
    manifest = dataclasses.replace(manifest, digest=manifest.compute_digest())
    dt = time.monotonic() - t0
    log.info("slice %s of %s: %d tensors, %d bytes, digests in %.2f s (%.0f MB/s)",
             manifest.digest[:12], model.path, len(tensors), total, dt, total / max(dt, 1e-9) / 1e6)
    return manifest


def check_model_matches(model, manifest: SliceManifest) -> None:
    """The model file is the one the manifest was made from, cut the same way."""
    identity = model_identity(model)
    if identity != manifest.model_identity:
        raise ClusterError(f"slice {manifest.digest[:12]}: model file {model.path} has identity "
                           f"{identity[:12]}, the manifest was made from {manifest.model_identity[:12]}"
                           f" (the file changed?)")
    cuts = slice_cuts(model, manifest.spec)
    expected = [dataclasses.replace(t, digest="") for t in manifest.tensors]
    if cuts != expected:
        raise ClusterError(f"slice {manifest.digest[:12]}: the manifest's tensors are not the "
                           f"cuts of {model.path} for its spec")


def iter_chunks(model, manifest: SliceManifest, names: Optional[Iterable[str]] = None,
                chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[Tuple[str, int, bytes]]:
    """(tensor name, byte offset in the tensor, bytes) for the named slice tensors (all by
    default), in manifest order, each tensor's bytes in order. The model must be the file
    the manifest was made from (checked first: header identity and cuts)."""
    if chunk_bytes <= 0:
        raise UsageError(f"chunk_bytes is {chunk_bytes}, expected a positive byte count")
    check_model_matches(model, manifest)
    wanted = None
    if names is not None:
        wanted = set(names)
        unknown = wanted - {t.name for t in manifest.tensors}
        if unknown:
            raise ProtocolError(f"slice {manifest.digest[:12]}: no tensor "
                                f"{', '.join(sorted(unknown)[:3])} in the manifest")
    for t in manifest.tensors:
        if wanted is not None and t.name not in wanted:
            continue
        offset = 0
        for chunk in cut_chunks(model, t, chunk_bytes):
            yield t.name, offset, chunk.tobytes()
            offset += chunk.nbytes


# -- weights of a slice file -------------------------------------------------------------

def slice_weights(slice_model, spec: Optional[SliceSpec] = None, copy: bool = True,
                  progress: Optional[Callable[[int, int], None]] = None) -> NodeWeights:
    """NodeWeights over a slice file (open_slice) whose tensors are already cut: no second
    cut; the spec's global head offsets stay for attention. spec defaults to the file's
    own and must equal it. copy: into anonymous (huge-page advised) memory, as
    load_weights does; else zero-copy views of the slice file's map."""
    own: SliceSpec = slice_model.slice
    spec = spec or own
    if spec != own:
        raise UsageError(f"slice file {slice_model.path} holds {own}, asked for {spec}")
    cfg: ModelConfig = slice_model.config
    total = sum(int(i.nbytes) for i in slice_model.tensors.values())
    done = [0]

    def t(name: str):
        arr, wtype = slice_model.tensor(name)
        if copy:
            out = anonymous_array(arr.shape, arr.dtype)
            out[...] = arr
            arr = out
        done[0] += int(arr.nbytes)
        if progress:
            progress(min(done[0], total), total)
        return Weight(arr, wtype)

    def vector(name: str) -> np.ndarray:
        arr, _ = slice_model.tensor(name)
        done[0] += int(arr.nbytes)
        return np.array(arr, dtype=np.float32).reshape(-1)     # small: a plain copy

    table = tensor_table(cfg)

    def held(kind: TensorKind, layer: Optional[int] = None):
        name = kind.name(layer)
        return vector(name) if len(kind.shape(cfg)) == 1 else t(name)

    layers = [LayerWeights(**{k.key: held(k, i) for k in table.layer})
              for i in range(cfg.n_layers)]
    rope_inv_freq = slice_model.rope_inv_freq()
    if rope_inv_freq.shape != (cfg.head_dim // 2,):
        raise ClusterError(f"slice file {slice_model.path}: rope_freqs.weight has "
                           f"{rope_inv_freq.shape[0]} values, expected {cfg.head_dim // 2}")

    def embed_rows(tokens: np.ndarray) -> np.ndarray:
        raise ClusterError(f"slice file {slice_model.path} holds no token embedding: the root "
                           f"embeds tokens and sends the activations")

    return NodeWeights(cfg, spec, embed_rows, layers, rope_inv_freq=rope_inv_freq,
                       **{k.key: held(k) for k in table.tail})
