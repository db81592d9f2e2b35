"""Streaming a node's slice: manifests and digests, the chunk source, the on-disk cache.

The oracle for every transfer is engine.load.load_weights (pread from the model file,
its own cutting code): a slice streamed through iter_chunks -> SliceCache.writer ->
open_slice -> slice_weights must give the same bytes, types and shapes."""
from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from dllama_node.cluster.slice_cache import SliceCache, SliceWriter, open_slice
from dllama_node.cluster.slice_file import lay_out, read_slice_header
from dllama_node.cluster.slices import (SliceManifest, SliceTensor, iter_chunks, model_identity,
                                        slice_manifest, slice_weights)
from dllama_node.common.errors import ClusterError, ModelFileError, ProtocolError, UsageError
from dllama_node.engine.load import load_weights
from dllama_node.engine.weights import NodeWeights
from dllama_node.model.tensors import SliceSpec
from dllama_node.model import open_model, quants
from dllama_node.model.config import RopeScaling
from dllama_node.model.generate import (PRESETS, model_metadata, model_tensor_types,
                                        tensor_chunks, write_gguf_model, write_random_model)
from dllama_node.model.loader import config_from_metadata

TINY = PRESETS["tiny"]      # dim 256, hidden 672, 4 layers, 8 heads, 2 KV heads, vocab 2048
SPECS = {"whole": None,
         "middle": SliceSpec((2, 6), (0, 2), (64, 416), (512, 1536)),
         "last": SliceSpec((7, 8), (1, 2), (640, 672), (2000, 2048))}
SMALL_CHUNK = 3000          # bytes: many chunks per tensor, not a multiple of any row


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("slices-models")
    paths = {}
    for wt in ("q4_0", "q8_0", "f32"):
        paths[wt] = str(d / f"tiny-{wt}.gguf")
        write_random_model(paths[wt], TINY, weight_type=wt, seed=5)
    # tied classifier and a rope_freqs.weight tensor (llama3 scaling)
    tied = dataclasses.replace(TINY, tied_embeddings=True,
                               rope_scaling=RopeScaling(8.0, 1.0, 4.0, 128))
    paths["tied"] = str(d / "tiny-tied.gguf")
    write_random_model(paths["tied"], tied, weight_type="q8_0", seed=6)
    paths["dllama-m"] = str(d / "tiny.m")
    write_random_model(paths["dllama-m"], TINY, weight_type="q4_0", seed=7, file_format="dllama-m")
    paths["bf16"] = str(d / "tiny-bf16.gguf")
    _write_bf16_model(paths["bf16"])
    return paths


def _write_bf16_model(path):
    """BF16 matrices: a type the kernels do not run, converted to Q8_0 at load."""
    def chunks_for(name, shape, ggml_type):
        if len(shape) == 1:
            return tensor_chunks(name, shape, quants.GGML_F32, 8)
        x = np.random.default_rng(len(name)).standard_normal(shape, dtype=np.float32) * 0.02
        return [(x.view(np.uint32) >> 16).astype(np.uint16)]
    write_gguf_model(path, model_metadata(TINY, quants.GGML_F32),
                     model_tensor_types(TINY, quants.GGML_BF16), chunks_for)


def _fields(w: NodeWeights):
    for i, lw in enumerate(w.layers):
        for name in ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"):
            yield f"blk.{i}.{name}", getattr(lw, name)
        yield f"blk.{i}.attn_norm", (lw.attn_norm, quants.GGML_F32)
        yield f"blk.{i}.ffn_norm", (lw.ffn_norm, quants.GGML_F32)
    yield "output_norm", (w.output_norm, quants.GGML_F32)
    yield "output", w.output
    yield "rope_inv_freq", (w.rope_inv_freq, quants.GGML_F32)


def assert_same_weights(got: NodeWeights, want: NodeWeights):
    assert got.config == want.config and got.slice == want.slice
    assert got.nbytes() == want.nbytes()
    for (name, (a, ta)), (_, (b, tb)) in zip(_fields(got), _fields(want)):
        assert ta == tb, name
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert a.tobytes() == b.tobytes(), name


def transfer(model, manifest, cache, chunk_bytes=SMALL_CHUNK, progress=None):
    with cache.writer(manifest, progress) as w:
        for name, offset, data in iter_chunks(model, manifest, chunk_bytes=chunk_bytes):
            w.write(name, offset, data)
        return w.finish()


# -- the whole path, against load_weights ---------------------------------------------

@pytest.mark.parametrize("spec_name", list(SPECS))
@pytest.mark.parametrize("kind", ["q4_0", "q8_0", "f32", "tied", "dllama-m", "bf16"])
def test_streamed_slice_equals_load_weights(models, tmp_path, kind, spec_name):
    with open_model(models[kind]) as m:
        spec = SPECS[spec_name] or SliceSpec.full(m.config)
        want = load_weights(m, spec)
        manifest = slice_manifest(m, spec)
        rope_bytes = m.tensors["rope_freqs.weight"].nbytes if "rope_freqs.weight" in m.tensors else 0
        assert manifest.total_bytes == want.nbytes() + rope_bytes
        if m.config.tied_embeddings:
            out = manifest.tensor("output.weight")
            assert out.source == "token_embd.weight" and out.rows == spec.vocab_rows
        assert all(t.source != "token_embd.weight" or t.name == "output.weight"
                   for t in manifest.tensors)
        seen = []
        path = transfer(m, manifest, SliceCache(str(tmp_path / "cache")),
                        progress=lambda done, total: seen.append((done, total)))
    assert seen[-1] == (manifest.total_bytes, manifest.total_bytes)
    assert all(a[0] <= b[0] for a, b in zip(seen, seen[1:]))
    with open_slice(path) as s:
        assert "token_embd.weight" not in s.tensors
        assert s.slice == spec and s.manifest == manifest
        got = slice_weights(s)
        assert_same_weights(got, want)
        views = slice_weights(s, copy=False)
        assert np.shares_memory(views.layers[0].wq[0], s.tensor("blk.0.attn_q.weight")[0])
        assert not np.shares_memory(got.layers[0].wq[0], s.tensor("blk.0.attn_q.weight")[0])
        with pytest.raises(ClusterError, match="embedding"):
            got.embed(np.array([1]), np.empty((1, TINY.dim), np.float32))


@pytest.mark.parametrize("spec", [SliceSpec((0, 8), (0, 2), (0, 0), (0, 0)),
                                  SliceSpec((0, 0), (0, 0), (0, 672), (0, 2048))],
                         ids=["no-ffn-no-vocab", "no-heads"])
def test_empty_ranges_stream_as_empty_tensors(models, tmp_path, spec):
    """A node without FFN rows or heads gets (n, 0) / (0, n) tensors. The oracle here is
    NodeWeights.bind's views (load_weights cannot pread an empty range)."""
    with open_model(models["q4_0"]) as m:
        manifest = slice_manifest(m, spec)
        assert any(t.nbytes == 0 for t in manifest.tensors)
        path = transfer(m, manifest, SliceCache(str(tmp_path)))
        want = NodeWeights.bind(m, spec)
        with open_slice(path) as s:
            assert_same_weights(slice_weights(s), want)


def test_slice_file_metadata_describes_the_model_and_the_spec(models, tmp_path):
    with open_model(models["tied"]) as m:
        spec = SPECS["middle"]
        manifest = slice_manifest(m, spec)
        path = transfer(m, manifest, SliceCache(str(tmp_path)))
        with open_slice(path) as s:
            md = s.metadata
            for key in ("q_heads", "kv_heads", "ffn_rows", "vocab_rows"):
                assert md[f"dllama.slice.{key}"] == list(getattr(spec, key))
            # the llama.* keys give back the model's config, as the loader reads them
            stand_ins = {"token_embd.weight": m.tensors["token_embd.weight"]}
            assert config_from_metadata(path, md, stand_ins) == m.config
            assert s.config == m.config
            np.testing.assert_array_equal(s.rope_inv_freq(), m.rope_inv_freq())
            with pytest.raises(ModelFileError, match="token_embd.weight"):
                s.dequantize_rows("token_embd.weight", np.array([0]))
        with pytest.raises(UsageError, match="holds"):
            slice_weights(open_slice(path), SliceSpec.full(m.config))


# -- manifests and digests ---------------------------------------------------------------

def _flip(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x55]))


def test_digest_changes_with_a_byte_inside_the_slice_only(models, tmp_path):
    spec = SPECS["middle"]
    path = str(tmp_path / "copy.gguf")
    shutil.copy(models["q4_0"], path)
    with open_model(path) as m:
        base = slice_manifest(m, spec)
        q_rb = quants.row_bytes(quants.GGML_Q4_0, TINY.dim)
        o_rb = quants.row_bytes(quants.GGML_Q4_0, TINY.q_dim)
        hd = TINY.head_dim
        q = m.tensors["blk.1.attn_q.weight"]
        o = m.tensors["blk.2.attn_output.weight"]
        inside = {"blk.1.attn_q.weight": q.offset + (spec.q_heads[0] * hd + 5) * q_rb + 7,
                  # row 9 of attn_output, a byte in the first column block of head 2
                  "blk.2.attn_output.weight":
                      o.offset + 9 * o_rb + quants.row_bytes(quants.GGML_Q4_0, spec.q_heads[0] * hd) + 3}
        outside = [q.offset + 3 * q_rb,                               # a head of another node
                   o.offset + 9 * o_rb + 3,                           # column of head 0
                   m.tensors["token_embd.weight"].offset + 100,       # the root's embedding
                   m.tensors["output.weight"].offset + 10]            # vocab row 0
    for off in outside:
        _flip(path, off)
        with open_model(path) as m:
            assert slice_manifest(m, spec) == base
        _flip(path, off)
    for name, off in inside.items():
        _flip(path, off)
        with open_model(path) as m:
            changed = slice_manifest(m, spec)
        _flip(path, off)
        assert changed.digest != base.digest
        assert changed.model_identity == base.model_identity
        diff = [a.name for a, b in zip(changed.tensors, base.tensors) if a != b]
        assert diff == [name]


def test_identity_covers_the_header_not_the_path(models, tmp_path):
    path = str(tmp_path / "renamed.gguf")
    shutil.copy(models["q8_0"], path)
    with open_model(models["q8_0"]) as a, open_model(path) as b:
        assert model_identity(a) == model_identity(b)
        assert slice_manifest(a, SPECS["last"]).digest == slice_manifest(b, SPECS["last"]).digest
    data = open(path, "rb").read()
    at = data.index(b"random-256x4-q8_0")
    _flip(path, at + 3)                     # general.name: a header byte, no weight byte
    with open_model(path) as b, open_model(models["q8_0"]) as a:
        assert model_identity(a) != model_identity(b)
        with pytest.raises(ClusterError, match="identity"):
            next(iter_chunks(b, slice_manifest(a, SPECS["last"])))


def test_manifest_json_round_trip_and_tampering(models):
    with open_model(models["tied"]) as m:
        manifest = slice_manifest(m, SPECS["last"])
    text = manifest.to_json()
    assert SliceManifest.from_json(text) == manifest
    assert SliceManifest.from_json(text).config.rope_scaling == manifest.config.rope_scaling
    d = manifest.to_dict()
    d["tensors"][3]["digest"] = "0" * 64
    with pytest.raises(ProtocolError, match="altered"):
        SliceManifest.from_dict(d)
    d = manifest.to_dict()
    d["digest"] = "../../etc/passwd"
    with pytest.raises(ProtocolError, match="hex digest"):
        SliceManifest.from_dict(d)
    with pytest.raises(ProtocolError, match="format"):
        SliceManifest.from_dict(dict(manifest.to_dict(), format="dllama-slice/0"))
    with pytest.raises(ProtocolError, match="JSON"):
        SliceManifest.from_json("{not json")


def test_spec_outside_the_model_is_refused(models):
    with open_model(models["q8_0"]) as m:
        with pytest.raises(UsageError, match=r"ffn_rows \[0, 700\) is not inside \[0, 672\)"):
            slice_manifest(m, SliceSpec((0, 8), (0, 2), (0, 700), (0, 2048)))


def test_iter_chunks_resends_only_the_named_tensors(models):
    with open_model(models["q8_0"]) as m:
        manifest = slice_manifest(m, SPECS["middle"])
        names = ["blk.3.ffn_down.weight", "blk.0.attn_q.weight"]
        got = list(iter_chunks(m, manifest, names=names, chunk_bytes=SMALL_CHUNK))
        assert [n for n in dict.fromkeys(n for n, _, _ in got)] == names[::-1]   # manifest order
        for name in names:
            parts = [(off, data) for n, off, data in got if n == name]
            assert [off for off, _ in parts] == list(np.cumsum([0] + [len(d) for _, d in parts[:-1]]))
            assert sum(len(d) for _, d in parts) == manifest.tensor(name).nbytes
        with pytest.raises(ProtocolError, match="token_embd.weight"):
            next(iter_chunks(m, manifest, names=["token_embd.weight"]))


# -- the writer: corruption, order, interruption -------------------------------------------

def test_a_corrupted_chunk_is_refused_naming_the_tensor_and_can_be_resent(models, tmp_path):
    with open_model(models["q4_0"]) as m:
        manifest = slice_manifest(m, SPECS["middle"])
        cache = SliceCache(str(tmp_path))
        bad_name = "blk.2.ffn_up.weight"
        with cache.writer(manifest) as w:
            errors = []
            for name, offset, data in iter_chunks(m, manifest, chunk_bytes=SMALL_CHUNK):
                if name == bad_name and offset == 0:
                    data = bytes([data[0] ^ 1]) + data[1:]
                try:
                    w.write(name, offset, data)
                except ClusterError as e:
                    errors.append(str(e))
            assert len(errors) == 1
            t = manifest.tensor(bad_name)
            assert bad_name in errors[0] and t.digest in errors[0]
            assert w.missing() == [bad_name]
            with pytest.raises(ClusterError, match=f"1 tensors incomplete, first {bad_name}"):
                w.finish()
            for name, offset, data in iter_chunks(m, manifest, names=w.missing()):
                w.write(name, offset, data)
            path = w.finish()
        want = load_weights(m, SPECS["middle"])
    with open_slice(path) as s:
        assert_same_weights(slice_weights(s), want)


def test_out_of_order_and_repeated_chunks(models, tmp_path):
    with open_model(models["f32"]) as m:
        manifest = slice_manifest(m, SPECS["last"])
        chunks = list(iter_chunks(m, manifest, chunk_bytes=SMALL_CHUNK))
        cache = SliceCache(str(tmp_path))
        with cache.writer(manifest) as w:
            rng = np.random.default_rng(0)
            order = rng.permutation(len(chunks))
            for i in order:
                w.write(*chunks[i])
                if i % 7 == 0:
                    w.write(*chunks[i])          # a duplicate
            path = w.finish()
        # bytes that arrive out of order and are wrong are caught from the file
        with cache.writer(manifest) as w:
            name = "blk.0.ffn_gate.weight"
            mine = [c for c in chunks if c[0] == name]
            assert len(mine) > 2
            for n, off, data in reversed(mine[1:]):
                w.write(n, off, data)
            with pytest.raises(ClusterError, match=name):
                w.write(name, 0, b"\0" * len(mine[0][2]))
            assert name in w.missing()
        assert os.listdir(tmp_path) == [os.path.basename(path)]
        want = load_weights(m, SPECS["last"])
    with open_slice(path) as s:
        assert_same_weights(slice_weights(s), want)


def test_bytes_outside_a_tensor_or_of_an_unknown_tensor_are_protocol_errors(models, tmp_path):
    with open_model(models["q8_0"]) as m:
        manifest = slice_manifest(m, SPECS["last"])
    with SliceCache(str(tmp_path)).writer(manifest) as w:
        n = manifest.tensor("blk.0.attn_k.weight").nbytes
        with pytest.raises(ProtocolError, match=rf"\[{n - 2}, {n + 2}\) outside"):
            w.write("blk.0.attn_k.weight", n - 2, b"\0" * 4)
        with pytest.raises(ProtocolError, match="token_embd.weight"):
            w.write("token_embd.weight", 0, b"\0")


def test_an_interrupted_transfer_leaves_nothing_behind(models, tmp_path):
    cache_dir = tmp_path / "cache"
    with open_model(models["q4_0"]) as m:
        manifest = slice_manifest(m, SPECS["middle"])
        cache = SliceCache(str(cache_dir))
        with pytest.raises(ConnectionResetError):
            with cache.writer(manifest) as w:
                for i, chunk in enumerate(iter_chunks(m, manifest)):
                    if i == 5:
                        raise ConnectionResetError("root went away")
                    w.write(*chunk)
        assert os.listdir(cache_dir) == []
        assert cache.lookup(manifest) is None
        w = cache.writer(manifest)
        w.abort()                               # abandoned without a with-block
        assert os.listdir(cache_dir) == []
    # a process killed mid-transfer leaves a hidden temp file; the next start removes it
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    stale = cache_dir / f".{manifest.digest}.{int(dead.stdout)}.0.partial"
    live = cache_dir / f".{manifest.digest}.{os.getpid()}.99.partial"
    stale.write_bytes(b"half")
    live.write_bytes(b"half")
    SliceCache(str(cache_dir))
    assert sorted(os.listdir(cache_dir)) == [live.name]


# -- the cache: lookup, eviction, directories ---------------------------------------------

def test_second_lookup_finds_the_cached_slice(models, tmp_path):
    with open_model(models["q8_0"]) as m:
        manifest = slice_manifest(m, SPECS["middle"])
        cache = SliceCache(str(tmp_path))
        assert cache.lookup(manifest) is None
        path = transfer(m, manifest, cache)
    again = SliceCache(str(tmp_path))             # the next start of the worker
    assert again.lookup(manifest) == path
    assert again.lookup(manifest, verify=True) == path
    # a flipped weight byte is found by verify; the file is dropped
    with open_slice(path) as s:
        off = s.tensors["blk.3.ffn_down.weight"].offset + 11
    _flip(path, off)
    assert again.lookup(manifest) == path         # the cheap check reads headers only
    assert again.lookup(manifest, verify=True) is None
    assert not os.path.exists(path)
    # a truncated file is not complete
    with open_model(models["q8_0"]) as m:
        path = transfer(m, manifest, again)
    os.truncate(path, os.path.getsize(path) - 1)
    assert again.lookup(manifest) is None and not os.path.exists(path)


def test_least_recently_used_slices_are_evicted(models, tmp_path):
    with open_model(models["q4_0"]) as m:
        manifests = [slice_manifest(m, SliceSpec((h, h + 2), (h // 4, h // 4 + 1), (0, 672), (0, 2048)))
                     for h in (0, 2, 4)]
        sizes = []
        probe = SliceCache(str(tmp_path / "probe"))
        for mf in manifests:
            sizes.append(os.path.getsize(transfer(m, mf, probe, chunk_bytes=1 << 20)))
        cache = SliceCache(str(tmp_path / "c"), max_bytes=sizes[0] + sizes[1] + sizes[2] // 2)
        a = transfer(m, manifests[0], cache)
        b = transfer(m, manifests[1], cache)
        os.utime(a, (1, 1))
        os.utime(b, (2, 2))
        assert cache.lookup(manifests[0]) == a    # a is now the most recently used
        c = transfer(m, manifests[2], cache)
        assert [p for p, _, _ in cache.entries()] == [a, c]
        assert cache.total_bytes() <= cache.max_bytes
        with pytest.raises(UsageError, match=rf"needs {sizes[0]} bytes .* at most 1000 bytes"):
            SliceCache(str(tmp_path / "d"), max_bytes=1000).writer(manifests[0])
        assert os.listdir(tmp_path / "d") == []


def test_cache_directory_is_created_and_an_unusable_one_is_a_clear_error(tmp_path):
    nested = tmp_path / "a" / "b" / "slices"
    SliceCache(str(nested))
    assert nested.is_dir()
    a_file = tmp_path / "plain-file"
    a_file.write_text("x")
    with pytest.raises(UsageError, match=f"slice cache directory {a_file}/sub is not usable"):
        SliceCache(str(a_file / "sub"))
    with pytest.raises(UsageError, match=f"{a_file} is not usable"):
        SliceCache(str(a_file))
    if os.geteuid() != 0:
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        with pytest.raises(UsageError, match="Permission denied"):
            SliceCache(str(ro))


# -- sizes past 32 bits -------------------------------------------------------------------

def test_sizes_and_offsets_past_four_gib(tmp_path):
    """A slice with a 5 GiB tensor: manifest JSON, the file's layout (sparse) and a write at
    an offset past 2**32 keep exact 64-bit numbers."""
    rows = (5 << 30) // quants.row_bytes(quants.GGML_Q8_0, 8192) + 1
    big = SliceTensor("blk.0.ffn_gate.weight", "blk.0.ffn_gate.weight", (0, rows), None,
                      quants.GGML_Q8_0, (rows, 8192), rows * quants.row_bytes(quants.GGML_Q8_0, 8192),
                      "ab" * 32)
    small = SliceTensor("output_norm.weight", "output_norm.weight", None, None, quants.GGML_F32,
                        (8192,), 4 * 8192, "cd" * 32)
    cfg = dataclasses.replace(TINY, dim=8192, hidden_dim=rows)
    manifest = SliceManifest("ef" * 32, 7 << 30, "gguf", "big", cfg, SliceSpec.full(cfg),
                             (big, small))
    manifest = dataclasses.replace(manifest, digest=manifest.compute_digest())
    assert big.nbytes > 5 << 30
    back = SliceManifest.from_json(manifest.to_json())
    assert back == manifest and back.total_bytes == big.nbytes + small.nbytes
    path = str(tmp_path / "big.partial")
    offsets, size = lay_out(path, manifest)
    assert os.path.getsize(path) == size > big.nbytes
    assert offsets["output_norm.weight"] > 5 << 30
    g, parsed = read_slice_header(path)
    assert parsed == manifest and g.tensors["output_norm.weight"].offset == offsets["output_norm.weight"]
    seen = []
    fd = os.open(path, os.O_RDWR)
    w = SliceWriter(manifest, fd, path, str(tmp_path / "big.gguf"), offsets, size,
                    SliceCache(str(tmp_path / "c")), lambda d, t: seen.append((d, t)))
    far = big.nbytes - 4096
    w.write(big.name, far, b"\1" * 4096)
    assert seen == [(4096, big.nbytes + small.nbytes)]
    assert os.pread(fd, 4, offsets[big.name] + far) == b"\1" * 4
    w.abort()
    assert not os.path.exists(path)
