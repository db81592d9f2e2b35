"""open_model on GGUF files: views, conversion at load, and every validation error."""
from __future__ import annotations

import logging
import os

import numpy as np
import pytest

from dllama_node.common.errors import ModelFileError, TokenizerError, UnsupportedModelError
from dllama_node.model import ModelConfig, RopeScaling, TensorInfo, open_model, quants
from dllama_node.model.generate import (llama3_rope_factors, model_metadata, model_tensor_types,
                                        random_tensor, tensor_chunks, write_gguf_model,
                                        write_random_model)
from dllama_node.model.gguf_writer import GGUFWriter

gguf = pytest.importorskip("gguf")

CFG = ModelConfig(arch="llama", dim=64, hidden_dim=160, n_layers=2, n_heads=4, n_kv_heads=2,
                  head_dim=16, vocab_size=300, seq_len=128)
Q4_0, Q8_0, F32, F16 = quants.GGML_Q4_0, quants.GGML_Q8_0, quants.GGML_F32, quants.GGML_F16


def _random_chunks(name, shape, ggml_type):
    return tensor_chunks(name, shape, ggml_type, seed=0)


def build(path, cfg=CFG, weight_type=Q4_0, metadata=None, tensors=None, chunks_for=_random_chunks):
    """A GGUF llama model; metadata / tensors: {key: value or None to drop} edits."""
    md = model_metadata(cfg, weight_type)
    for k, v in (metadata or {}).items():
        if v is None:
            md.pop(k, None)
        else:
            md[k] = v
    tt = model_tensor_types(cfg, weight_type)
    for k, v in (tensors or {}).items():
        if v is None:
            tt.pop(k, None)
        else:
            tt[k] = v
    write_gguf_model(path, md, tt, chunks_for)
    return path


def _patch_tensor_type(path, name, new_type):
    """Rewrite the type field of one tensor info in place."""
    blob = bytearray(open(path, "rb").read())
    key = len(name).to_bytes(8, "little") + name.encode()
    at = blob.index(key) + len(key)
    n_dims = int.from_bytes(blob[at:at + 4], "little")
    at += 4 + 8 * n_dims
    blob[at:at + 4] = new_type.to_bytes(4, "little")
    open(path, "wb").write(bytes(blob))


# -- reading ------------------------------------------------------------------------

@pytest.mark.parametrize("weight_type", ["q4_0", "q8_0", "f16", "f32"])
def test_views_are_zero_copy_and_hold_what_was_written(tmp_path, weight_type):
    path = tmp_path / "m.gguf"
    write_random_model(path, CFG, weight_type, seed=7)
    wt = {"q4_0": Q4_0, "q8_0": Q8_0, "f16": F16, "f32": F32}[weight_type]
    reader = gguf.GGUFReader(path)       # the external oracle for offsets and types
    oracle = {t.name: t for t in reader.tensors}
    with open_model(path) as m:
        assert m.format == "gguf" and m.config == CFG and m.file_size == os.path.getsize(path)
        assert m.metadata["tokenizer.ggml.model"] == "llama"
        assert set(m.tensors) == set(oracle)
        for name, info in m.tensors.items():
            assert isinstance(info, TensorInfo)
            assert info.offset == oracle[name].data_offset and info.nbytes == oracle[name].n_bytes
            arr, kt = m.tensor(name)
            shape = model_tensor_types(CFG, wt)[name][0]
            expected = random_tensor(name, shape, F32 if len(shape) == 1 else wt, seed=7)
            if len(shape) == 1:
                assert kt == F32 and arr.dtype == np.float32 and arr.shape == shape
            elif wt in (Q4_0, Q8_0):
                assert kt == wt and arr.dtype == np.uint8
                assert arr.shape == (shape[0], quants.row_bytes(wt, shape[1]))
            else:
                assert kt == wt and arr.shape == shape
                assert arr.dtype == (np.float32 if wt == F32 else np.float16)
            np.testing.assert_array_equal(arr, expected.reshape(arr.shape))
            assert np.shares_memory(arr, m._map), name
            assert not arr.flags.writeable


def test_per_tensor_maps_give_the_same_views(tmp_path):
    path = build(tmp_path / "m.gguf")
    with open_model(path) as whole, open_model(path, whole_file_map=False) as parts:
        assert parts._map is None
        for name in whole.tensors:
            a, ka = whole.tensor(name)
            b, kb = parts.tensor(name)
            assert ka == kb
            np.testing.assert_array_equal(a, b)


def test_close_releases_the_map_and_keeps_views_valid(tmp_path):
    path = build(tmp_path / "m.gguf")
    m = open_model(path)
    arr, _ = m.tensor("blk.1.ffn_norm.weight")
    copy = arr.copy()
    m.close()
    with pytest.raises(ValueError, match="closed"):
        m.tensor("blk.1.ffn_norm.weight")
    np.testing.assert_array_equal(arr, copy)


def test_f16_norms_come_back_float32(tmp_path):
    path = build(tmp_path / "m.gguf", tensors={"blk.0.attn_norm.weight": ((64,), F16)})
    with open_model(path) as m:
        arr, kt = m.tensor("blk.0.attn_norm.weight")
        assert kt == F32 and arr.dtype == np.float32
        raw = random_tensor("blk.0.attn_norm.weight", (64,), F16)
        np.testing.assert_array_equal(arr, raw.astype(np.float32))
        assert m.kernel_nbytes("blk.0.attn_norm.weight") == 256


def test_other_types_are_converted_at_load_with_one_warning_per_type(tmp_path, caplog):
    rng = np.random.default_rng(3)

    def q6k_blocks(n_blocks):
        raw = rng.integers(0, 256, size=(n_blocks, 210), dtype=np.uint8)
        raw[:, 208:210] = (rng.uniform(1e-4, 1e-3, n_blocks)).astype("<f2").view(np.uint8).reshape(-1, 2)
        return raw

    stored = {}

    def chunks_for(name, shape, ggml_type):
        if ggml_type == quants.GGML_BF16:
            stored[name] = bf16
            return [bf16]
        if ggml_type == 14:
            stored[name] = q6k_blocks(shape[0] * shape[1] // 256)
            return [stored[name]]
        return tensor_chunks(name, shape, ggml_type)

    cfg = ModelConfig(**{**CFG.__dict__, "dim": 256})          # Q6_K rows need 256 values
    tensors = {f"blk.{i}.ffn_{p}.weight": ((cfg.hidden_dim, cfg.dim), quants.GGML_BF16)
               for i in range(2) for p in ("gate", "up")}
    tensors["output.weight"] = ((cfg.vocab_size, cfg.dim), 14)
    x = rng.standard_normal((cfg.hidden_dim, cfg.dim)).astype(np.float32) * 0.02
    bf16 = gguf.quants.quantize(x, gguf.GGMLQuantizationType.BF16)
    path = build(tmp_path / "m.gguf", cfg=cfg, tensors=tensors, chunks_for=chunks_for)

    caplog.set_level(logging.WARNING, logger="dllama_node.model.loader")
    with open_model(path) as m:
        warnings = [r.getMessage() for r in caplog.records]
        assert len(warnings) == 2
        assert any("4 tensors are BF16" in w for w in warnings)
        assert any("1 tensors are Q6_K" in w for w in warnings)
        info = m.tensors["blk.0.ffn_up.weight"]
        assert info.ggml_type == quants.GGML_BF16          # the type as stored
        arr, kt = m.tensor("blk.0.ffn_up.weight")
        assert kt == Q8_0 and arr.shape == (cfg.hidden_dim, cfg.dim // 32 * 34)
        assert m.kernel_type("blk.0.ffn_up.weight") == Q8_0
        assert m.kernel_nbytes("blk.0.ffn_up.weight") == arr.nbytes
        oracle = gguf.quants.dequantize(bf16, gguf.GGMLQuantizationType.BF16)
        np.testing.assert_array_equal(arr, quants.quantize_q8_0(oracle))
        out, kt = m.tensor("output.weight")
        q6 = gguf.quants.dequantize(stored["output.weight"].reshape(-1),
                                    gguf.GGMLQuantizationType.Q6_K).reshape(cfg.vocab_size, cfg.dim)
        assert kt == Q8_0
        np.testing.assert_array_equal(out, quants.quantize_q8_0(q6))


def test_rope_freqs_and_tied_embeddings(tmp_path):
    cfg = ModelConfig(arch="llama", dim=64, hidden_dim=96, n_layers=1, n_heads=2, n_kv_heads=1,
                      head_dim=32, vocab_size=280, seq_len=4096, rope_theta=500000.0,
                      rope_scaling=RopeScaling(32.0, 1.0, 4.0, 8192), tied_embeddings=True)
    path = tmp_path / "l3.gguf"
    write_random_model(path, cfg, "q8_0")
    with open_model(path) as m:
        assert "output.weight" not in m.tensors and m.config.tied_embeddings
        assert m.config.rope_scaling is None         # GGUF carries it as the rope_freqs tensor
        freqs, kt = m.tensor("rope_freqs.weight")
        assert kt == F32 and freqs.shape == (16,)
        np.testing.assert_array_equal(freqs, llama3_rope_factors(cfg))
        # the same rotation speeds as the config's own llama3 formula
        np.testing.assert_allclose(m.rope_inv_freq(), cfg.rope_inv_freq(), rtol=1e-6)
        assert not np.allclose(m.rope_inv_freq(), m.config.rope_inv_freq())


# -- errors: each names the thing and the number ------------------------------------

def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ModelFileError, match=r"model file .*nope.gguf does not exist"):
        open_model(tmp_path / "nope.gguf")
    with pytest.raises(ModelFileError, match="is not a regular file"):
        open_model(tmp_path)


def test_wrong_magic_says_what_was_found_and_expected(tmp_path):
    path = tmp_path / "x.zip"
    path.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    with pytest.raises(ModelFileError) as e:
        open_model(path)
    msg = str(e.value)
    assert "b'PK\\x03\\x04'" in msg and "0x04034b50" in msg
    assert "b'GGUF'" in msg and "0x0a00abcd" in msg
    path.write_bytes(b"GG")
    with pytest.raises(ModelFileError, match="reading the magic at byte 0 needs 4 bytes, the file has 2"):
        open_model(path)


def test_unsupported_version(tmp_path):
    path = build(tmp_path / "m.gguf")
    blob = bytearray(path.read_bytes())
    blob[4:8] = (4).to_bytes(4, "little")
    path.write_bytes(bytes(blob))
    with pytest.raises(UnsupportedModelError, match="GGUF version 4 is not supported; supported: 2, 3"):
        open_model(path)


def test_truncated_header_says_at_which_byte_reading_what(tmp_path):
    path = build(tmp_path / "m.gguf")
    blob = path.read_bytes()
    last = model_metadata(CFG, Q4_0)["tokenizer.ggml.tokens"][-1].encode()
    start = blob.index(len(last).to_bytes(8, "little") + last)
    path.write_bytes(blob[:start + 4])          # half of the last token's length field
    with pytest.raises(ModelFileError, match=rf"truncated header: reading length of "
                                             rf"tokenizer\.ggml\.tokens\[299\] at byte {start} needs "
                                             rf"8 bytes, the file has {start + 4} bytes"):
        open_model(path)


def test_tensor_data_outside_the_file(tmp_path):
    path = build(tmp_path / "m.gguf")
    with open_model(path) as m:
        info = m.tensors["output.weight"]
        size = m.file_size
    assert info.offset + info.nbytes == size
    os.truncate(path, size - 100)
    with pytest.raises(ModelFileError, match=f"tensor output.weight: data ends at byte {size}, "
                                             f"file has {size - 100} bytes \\(truncated\\?\\)"):
        open_model(path)


def test_missing_tensor(tmp_path):
    path = build(tmp_path / "m.gguf", tensors={"blk.1.ffn_up.weight": None})
    with pytest.raises(ModelFileError, match="tensor blk.1.ffn_up.weight is missing"):
        open_model(path)


def test_wrong_shape(tmp_path):
    path = build(tmp_path / "m.gguf", tensors={"blk.1.attn_q.weight": ((64, 32), Q4_0)})
    with pytest.raises(ModelFileError, match="tensor blk.1.attn_q.weight: expected 64x64, found 64x32"):
        open_model(path)


def test_unsupported_architecture(tmp_path):
    path = build(tmp_path / "m.gguf", metadata={"general.architecture": "qwen2"})
    with pytest.raises(UnsupportedModelError, match="architecture 'qwen2' is not supported; 'llama' is"):
        open_model(path)
    path = build(tmp_path / "m.gguf", metadata={"general.architecture": None})
    with pytest.raises(ModelFileError, match="general.architecture is missing"):
        open_model(path)


def test_missing_metadata_key(tmp_path):
    path = build(tmp_path / "m.gguf", metadata={"llama.block_count": None})
    with pytest.raises(ModelFileError, match="metadata key llama.block_count is missing"):
        open_model(path)


def test_type_without_converter(tmp_path):
    # I8 (one byte a value) where an F16 matrix was: the layout stays inside the file
    path = build(tmp_path / "m.gguf", tensors={"blk.0.ffn_down.weight": ((64, 160), F16)})
    _patch_tensor_type(path, "blk.0.ffn_down.weight", 24)
    with pytest.raises(UnsupportedModelError, match=r"tensor blk.0.ffn_down.weight: type I8 has no "
                                                    r"converter \(supported: F32, F16, Q4_0"):
        open_model(path)
    cfg = ModelConfig(**{**CFG.__dict__, "dim": 256, "hidden_dim": 256})
    path = build(tmp_path / "m2.gguf", cfg=cfg, tensors={"blk.0.ffn_down.weight": ((256, 256), 16)},
                 chunks_for=lambda n, s, t: [np.zeros(s[0] * s[1] // 256 * 66, np.uint8)]
                 if t == 16 else tensor_chunks(n, s, t))
    with pytest.raises(UnsupportedModelError, match="tensor blk.0.ffn_down.weight: type IQ2_XXS has "
                                                    "no converter"):
        open_model(path)


def test_unknown_type_id(tmp_path):
    path = build(tmp_path / "m.gguf")
    _patch_tensor_type(path, "blk.0.ffn_down.weight", 99)
    with pytest.raises(UnsupportedModelError, match="tensor blk.0.ffn_down.weight has unknown type 99"):
        open_model(path)


def test_row_length_not_a_multiple_of_the_block(tmp_path):
    cfg = ModelConfig(**{**CFG.__dict__, "hidden_dim": 40})
    path = build(tmp_path / "m.gguf", cfg=cfg, weight_type=F32)
    _patch_tensor_type(path, "blk.0.ffn_down.weight", Q4_0)
    with pytest.raises(ModelFileError, match="tensor blk.0.ffn_down.weight: row length 40 is not a "
                                             "multiple of the Q4_0 block size 32"):
        open_model(path)


def test_metadata_counts_that_overflow_the_file(tmp_path):
    path = build(tmp_path / "m.gguf")
    blob = bytearray(path.read_bytes())
    blob[16:24] = (10 ** 12).to_bytes(8, "little")          # kv_count
    path.write_bytes(bytes(blob))
    with pytest.raises(ModelFileError, match="header claims 1000000000000 metadata entries"):
        open_model(path)


def test_vocab_size_mismatches_name_both_numbers(tmp_path):
    path = build(tmp_path / "m.gguf", metadata={"llama.vocab_size": 320})
    with pytest.raises(ModelFileError, match="llama.vocab_size is 320, token_embd.weight has 300 rows"):
        open_model(path)
    md_tokens = model_metadata(CFG, Q4_0)["tokenizer.ggml.tokens"][:299]
    path = build(tmp_path / "m.gguf", metadata={"tokenizer.ggml.tokens": md_tokens})
    with pytest.raises(TokenizerError, match="the tokenizer has 299 tokens, the model's "
                                             "token_embd.weight has 300 rows"):
        open_model(path)


def test_rope_scaling_we_cannot_express_is_refused(tmp_path):
    path = build(tmp_path / "m.gguf", metadata={"llama.rope.scaling.type": "linear",
                                                "llama.rope.scaling.factor": 4.0})
    with pytest.raises(UnsupportedModelError, match="rope scaling type 'linear' \\(factor 4.0\\)"):
        open_model(path)
    path = build(tmp_path / "m.gguf", metadata={"llama.rope.scaling.type": "linear",
                                                "llama.rope.scaling.factor": 1.0})
    assert open_model(path).config.rope_scaling is None


def test_head_counts_are_checked(tmp_path):
    path = build(tmp_path / "m.gguf", metadata={"llama.attention.head_count_kv": 3})
    with pytest.raises(ModelFileError, match="head_count 4 is not a multiple of attention.head_count_kv 3"):
        open_model(path)


# -- past 4 GiB -----------------------------------------------------------------------

def test_sparse_file_with_tensors_past_4_gib(tmp_path):
    """token_embd is 4 GiB + 256 KiB of holes; the layer tensors after it sit past byte
    2^32, and a few known values are written into the embedding's last row."""
    dim, vocab = 1024, 2 ** 20 + 64
    cfg = ModelConfig(arch="llama", dim=dim, hidden_dim=64, n_layers=1, n_heads=4, n_kv_heads=1,
                      head_dim=256, vocab_size=vocab, seq_len=64, tied_embeddings=True)
    md = {k: v for k, v in model_metadata(CFG, Q8_0).items() if not k.startswith("tokenizer.")}
    md.update({"llama.vocab_size": vocab, "llama.embedding_length": dim, "llama.block_count": 1,
               "llama.feed_forward_length": 64, "llama.attention.head_count": 4,
               "llama.attention.head_count_kv": 1, "llama.attention.key_length": 256,
               "llama.attention.value_length": 256, "llama.rope.dimension_count": 256})
    tensors = model_tensor_types(cfg, Q8_0)
    tensors["token_embd.weight"] = ((vocab, dim), F32)
    path = tmp_path / "big.gguf"
    with GGUFWriter(path) as w:
        for k, v in md.items():
            w.add(k, v)
        for name, (shape, t) in tensors.items():
            w.add_tensor_info(name, shape, t)
        w.write_header()
        for name, (shape, t) in tensors.items():
            if name == "token_embd.weight":
                w.skip_tensor(name)
            else:
                w.write_tensor(name, random_tensor(name, shape, t if len(shape) == 2 else F32))
        q_offset = w.tensor_offset("blk.0.attn_q.weight")
        embd_offset = w.tensor_offset("token_embd.weight")
        total = w.total_size
    assert q_offset > 2 ** 32 and os.path.getsize(path) == total
    last_row = embd_offset + (vocab - 1) * dim * 4
    assert last_row > 2 ** 32
    known = np.arange(dim, dtype="<f4") / 8
    with open(path, "r+b") as f:
        f.seek(last_row)
        f.write(known.tobytes())

    oracle = {t.name: t for t in gguf.GGUFReader(path).tensors}
    for whole in (True, False):
        with open_model(path, whole_file_map=whole) as m:
            assert m.config.vocab_size == vocab and m.file_size == total > 2 ** 32
            info = m.tensors["blk.0.attn_q.weight"]
            assert info.offset == q_offset == oracle["blk.0.attn_q.weight"].data_offset
            q, kt = m.tensor("blk.0.attn_q.weight")
            np.testing.assert_array_equal(q, random_tensor("blk.0.attn_q.weight", (dim, dim), Q8_0))
            norm, _ = m.tensor("output_norm.weight")
            np.testing.assert_array_equal(norm, random_tensor("output_norm.weight", (dim,), F32))
            embd, kt = m.tensor("token_embd.weight")
            assert kt == F32 and embd.shape == (vocab, dim)
            np.testing.assert_array_equal(embd[vocab - 1], known)
            assert not embd[vocab - 2].any()          # a hole reads as zeros


def test_row_ranges_and_dequantized_rows(tmp_path):
    """A node's slice [start, stop) of a matrix: a view for kernel types, converted
    alone for other types; embedding rows dequantized straight from the file."""
    cfg = ModelConfig(**{**CFG.__dict__, "dim": 256})
    rng = np.random.default_rng(9)
    x = rng.standard_normal((cfg.vocab_size, cfg.dim)).astype(np.float32)
    stored = {"output.weight": gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q5_0)}

    def chunks_for(name, shape, ggml_type):
        return [stored[name]] if name in stored else tensor_chunks(name, shape, ggml_type)
    path = build(tmp_path / "m.gguf", cfg=cfg, tensors={"output.weight": ((cfg.vocab_size, cfg.dim), 6)},
                 chunks_for=chunks_for)
    with open_model(path) as m:
        full, kt = m.tensor("output.weight")
        part, kt2 = m.tensor("output.weight", rows=(100, 173))
        assert kt == kt2 == Q8_0 and part.shape == (73, cfg.dim // 32 * 34)
        np.testing.assert_array_equal(part, full[100:173])
        q, _ = m.tensor("blk.0.attn_q.weight")
        qpart, kt = m.tensor("blk.0.attn_q.weight", rows=(16, 48))
        assert kt == Q4_0 and np.shares_memory(qpart, m._map)
        np.testing.assert_array_equal(qpart, q[16:48])
        with pytest.raises(ValueError, match=r"rows \[10, 400\) outside \[0, 300\)"):
            m.tensor("output.weight", rows=(10, 400))
        with pytest.raises(ValueError, match="needs a matrix"):
            m.tensor("output_norm.weight", rows=(0, 1))
        idx = np.array([5, 299, 0, 5])
        oracle = gguf.quants.dequantize(stored["output.weight"], gguf.GGMLQuantizationType.Q5_0)
        np.testing.assert_array_equal(m.dequantize_rows("output.weight", idx), oracle[idx])
        embd, _ = m.tensor("token_embd.weight")
        np.testing.assert_array_equal(m.dequantize_rows("token_embd.weight", idx),
                                      quants.dequantize_q4_0(embd[idx]))
