"""GGUF: our reader and writer against the `gguf` package (the external oracle), the
GGML type table, and the dequantizers against gguf.quants.dequantize."""
from __future__ import annotations

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from dllama_node.common.errors import ModelFileError, UnsupportedModelError  # noqa: E402
from dllama_node.model import convert, quants  # noqa: E402
from dllama_node.model.gguf import ValueType, read_gguf  # noqa: E402
from dllama_node.model.gguf_writer import GGUFWriter  # noqa: E402

GT = gguf.GGMLQuantizationType


def _assert_same_value(ours, theirs, key):
    if isinstance(theirs, float):
        assert np.float32(ours) == np.float32(theirs), key
    elif isinstance(theirs, list) and theirs and isinstance(theirs[0], float):
        np.testing.assert_array_equal(np.float32(ours), np.float32(theirs), err_msg=key)
    else:
        assert ours == theirs, key


# -- the type table -------------------------------------------------------------------

def test_type_table_matches_gguf_constants():
    for qtype, (block_size, block_bytes) in gguf.GGML_QUANT_SIZES.items():
        if int(qtype) not in quants.GGML_TYPES:
            continue        # types newer than our table are reported as unknown
        if qtype == GT.Q8_1:
            continue        # gguf-py says 40 (two f32); ggml's block_q8_1 is two f16: 36
        t = quants.GGML_TYPES[int(qtype)]
        assert (t.name, t.block_size, t.block_bytes) == (qtype.name, block_size, block_bytes)
    # every type we know, gguf knows with the same id
    for tid, t in quants.GGML_TYPES.items():
        assert GT(tid).name == t.name


def test_row_bytes_keeps_its_four_types_and_extends():
    assert quants.row_bytes(quants.GGML_Q4_0, 4096) == 128 * 18
    assert quants.row_bytes(quants.GGML_Q8_0, 64) == 68
    assert quants.row_bytes(quants.GGML_F16, 10) == 20
    assert quants.row_bytes(12, 512) == 2 * 144          # Q4_K
    with pytest.raises(ValueError):
        quants.row_bytes(99, 32)


# -- dequantizers ---------------------------------------------------------------------

# Byte offsets of the f16 scale fields of each block type: random bytes there could be
# inf/nan, so the tests put finite small scales there and random bytes everywhere else.
F16_FIELDS = {"Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0],
              "Q2_K": [80, 82], "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208],
              "IQ4_NL": [0], "IQ4_XS": [0]}


def _random_blocks(rng, t, n_blocks):
    if t.name == "BF16":
        x = rng.standard_normal(n_blocks).astype(np.float32)
        return (x.view(np.uint32) >> 16).astype("<u2").view(np.uint8).reshape(n_blocks, 2)
    if t.name in ("F32", "F16"):
        dt = {"F32": "<f4", "F16": "<f2"}[t.name]
        return rng.standard_normal(n_blocks).astype(dt).view(np.uint8).reshape(n_blocks, -1)
    raw = rng.integers(0, 256, size=(n_blocks, t.block_bytes), dtype=np.uint8)
    for p in F16_FIELDS[t.name]:
        scale = (rng.standard_normal(n_blocks) * 0.01).astype("<f2")
        raw[:, p:p + 2] = scale.view(np.uint8).reshape(n_blocks, 2)
    return raw


@pytest.mark.parametrize("type_id", sorted(t for t in convert.DEQUANTIZERS if t != 28))
def test_dequantize_matches_gguf_on_random_blocks(type_id):
    t = quants.GGML_TYPES[type_id]
    rng = np.random.default_rng(type_id)
    raw = _random_blocks(rng, t, 96)
    theirs = gguf.quants.dequantize(raw.reshape(-1), GT(type_id)).astype(np.float32)
    ours = convert.dequantize(raw.reshape(-1), type_id)
    assert ours.dtype == np.float32 and ours.shape == (96 * t.block_size,)
    # same float32 operation order as GGML: bit-exact
    np.testing.assert_array_equal(ours, theirs.reshape(-1))


@pytest.mark.parametrize("type_id", [3, 6, 7, 30])
def test_dequantize_matches_gguf_on_quantized_rows(type_id):
    """Blocks made by gguf's own quantizer (realistic values, not random bytes)."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 256)).astype(np.float32)
    q = gguf.quants.quantize(x, GT(type_id))
    ours = convert.dequantize(q, type_id)
    np.testing.assert_array_equal(ours, gguf.quants.dequantize(q, GT(type_id)))
    assert np.abs(ours - x).max() < 0.3       # and it is a dequantization of x


def test_dequantize_f64_and_shape_of_rows():
    x = np.arange(12, dtype="<f8").reshape(3, 4) / 7
    out = convert.dequantize(x.view(np.uint8), 28)
    np.testing.assert_array_equal(out, x.astype(np.float32))


def test_dequantize_without_converter_names_the_type():
    with pytest.raises(UnsupportedModelError, match="IQ2_XXS"):
        convert.dequantize(np.zeros(66, np.uint8), 16)


def test_convert_tensor_requantizes_matrices_to_q8_0_and_vectors_to_f32():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((5, 512)).astype(np.float32)
    q4k = gguf.quants.quantize(x, GT.BF16)
    arr, kt = convert.convert_tensor(q4k, 30, (5, 512))
    assert kt == quants.GGML_Q8_0 and arr.shape == (5, 16 * 34) and arr.dtype == np.uint8
    np.testing.assert_allclose(quants.dequantize_q8_0(arr), x, atol=0.05)
    vec, kt = convert.convert_tensor(q4k[0], 30, (512,))
    assert kt == quants.GGML_F32 and vec.shape == (512,)
    np.testing.assert_allclose(vec, x[0], rtol=1e-2)
    # a row that is not whole 32-value blocks cannot become Q8_0: F32
    odd = x[:, :40].astype("<f2")
    arr, kt = convert.convert_tensor(odd.view(np.uint8), 1, (5, 40))
    assert kt == quants.GGML_F16 and arr.dtype == np.float16    # F16 matrices stay as they are
    assert np.shares_memory(arr, odd)
    arr, kt = convert.convert_tensor(gguf.quants.quantize(x[:, :40], GT.BF16), 30, (5, 40))
    assert kt == quants.GGML_F32 and arr.shape == (5, 40)


def test_convert_tensor_works_in_chunks(monkeypatch):
    monkeypatch.setattr(convert, "CHUNK_VALUES", 256)      # 1 row of 256 per step
    rng = np.random.default_rng(3)
    x = rng.standard_normal((7, 256)).astype(np.float32)
    raw = gguf.quants.quantize(x, GT.Q5_0)
    arr, kt = convert.convert_tensor(raw, 6, (7, 256))
    np.testing.assert_array_equal(arr, quants.quantize_q8_0(gguf.quants.dequantize(raw, GT.Q5_0)))


# -- writer and reader against the gguf package ------------------------------------------

def _sample_metadata():
    return [
        ("t.u8", 200, ValueType.UINT8), ("t.i8", -5, ValueType.INT8),
        ("t.u16", 60000, ValueType.UINT16), ("t.i16", -30000, ValueType.INT16),
        ("t.u32", 4_000_000_000, ValueType.UINT32), ("t.i32", -2_000_000_000, ValueType.INT32),
        ("t.f32", 1e-5, ValueType.FLOAT32), ("t.bool", True, ValueType.BOOL),
        ("t.str", "héllo ▁wörld", ValueType.STRING), ("t.u64", 2 ** 40 + 3, ValueType.UINT64),
        ("t.i64", -(2 ** 40), ValueType.INT64), ("t.f64", 1 / 3, ValueType.FLOAT64),
    ]


def test_our_writer_is_read_identically_by_gguf_reader(tmp_path):
    path = tmp_path / "ours.gguf"
    rng = np.random.default_rng(4)
    tensors = {
        "a.f32": (rng.standard_normal((3, 5)).astype(np.float32), quants.GGML_F32, (3, 5)),
        "b.f16": (rng.standard_normal(7).astype(np.float16), quants.GGML_F16, (7,)),
        "c.q4_0": (quants.quantize_q4_0(rng.standard_normal((2, 64))), quants.GGML_Q4_0, (2, 64)),
        "d.q8_0": (quants.quantize_q8_0(rng.standard_normal((3, 32))), quants.GGML_Q8_0, (3, 32)),
    }
    with GGUFWriter(path, alignment=64) as w:
        for key, value, vtype in _sample_metadata():
            w.add(key, value, vtype)
        w.add("t.arr.str", ["a", "", "▁b"])
        w.add("t.arr.f32", np.array([0.5, -1.25], dtype=np.float32))
        w.add("t.arr.i32", [1, -2, 3])
        w.add("t.arr.bool", [True, False])
        w.add("t.arr.u64", np.array([2 ** 63, 1], dtype=np.uint64))
        for name, (data, gtype, shape) in tensors.items():
            w.add_tensor_info(name, shape, gtype)
        w.write_header()
        for name, (data, _, _) in tensors.items():
            w.write_tensor(name, data)

    r = gguf.GGUFReader(path)
    fields = {k: f for k, f in r.fields.items() if not k.startswith("GGUF.")}
    for key, value, vtype in _sample_metadata():
        assert fields[key].types == [gguf.GGUFValueType(int(vtype))], key
        _assert_same_value(value, fields[key].contents(), key)
    assert fields["t.arr.str"].contents() == ["a", "", "▁b"]
    assert fields["t.arr.f32"].contents() == [0.5, -1.25]
    assert fields["t.arr.i32"].contents() == [1, -2, 3]
    assert fields["t.arr.bool"].contents() == [True, False]
    assert fields["t.arr.u64"].contents() == [2 ** 63, 1]
    assert fields["general.alignment"].contents() == 64
    assert r.alignment == 64
    ours = read_gguf(path)
    for t in r.tensors:
        data, gtype, shape = tensors[t.name]
        assert int(t.tensor_type) == gtype
        assert t.data_offset % 64 == 0 and t.data_offset == ours.tensors[t.name].offset
        np.testing.assert_array_equal(np.asarray(t.data).reshape(-1).view(np.uint8),
                                      np.ascontiguousarray(data).reshape(-1).view(np.uint8))
    assert ours.metadata["t.str"] == "héllo ▁wörld"
    assert ours.metadata["t.f32"] == 1e-5       # the shortest decimal of the float32


def test_gguf_writer_files_are_read_identically_by_our_reader(tmp_path):
    path = tmp_path / "theirs.gguf"
    rng = np.random.default_rng(5)
    w = gguf.GGUFWriter(path, arch="llama")
    for key, value, vtype in _sample_metadata():
        w.add_key_value(key, value, gguf.GGUFValueType(int(vtype)))
    w.add_array("t.arr.str", ["x", "yy", ""])
    w.add_array("t.arr.f32", [0.25, 2.0])
    w.add_array("t.arr.int", [7, -8])
    x = rng.standard_normal((4, 256)).astype(np.float32)
    raw = {
        "f32": x, "f16": x.astype(np.float16),
        "q4_0": gguf.quants.quantize(x, GT.Q4_0), "q8_0": gguf.quants.quantize(x, GT.Q8_0),
        "bf16": gguf.quants.quantize(x, GT.BF16), "q5_1": gguf.quants.quantize(x, GT.Q5_1),
        "vec": rng.standard_normal(3).astype(np.float32),
    }
    qtypes = {"q4_0": GT.Q4_0, "q8_0": GT.Q8_0, "bf16": GT.BF16, "q5_1": GT.Q5_1}
    for name, data in raw.items():
        w.add_tensor(name, data, raw_dtype=qtypes.get(name))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    ours = read_gguf(path)
    r = gguf.GGUFReader(path)
    for key, f in r.fields.items():
        if key.startswith("GGUF."):
            continue
        _assert_same_value(ours.metadata[key], f.contents(), key)
        assert int(ours.value_types[key][0]) == int(f.types[0]), key
    assert ours.metadata["general.architecture"] == "llama"
    assert ours.metadata["t.arr.str"] == ["x", "yy", ""]
    assert len(ours.tensors) == len(r.tensors)
    with open(path, "rb") as fh:
        blob = fh.read()
    for t in r.tensors:
        mine = ours.tensors[t.name]
        assert mine.offset == t.data_offset and mine.nbytes == t.n_bytes
        assert mine.ggml_type == int(t.tensor_type)
        assert mine.shape == tuple(int(s) for s in reversed(t.shape))
        np.testing.assert_array_equal(
            np.frombuffer(blob, np.uint8, mine.nbytes, mine.offset),
            np.asarray(t.data).reshape(-1).view(np.uint8))
    assert ours.tensors["f32"].shape == (4, 256) and ours.tensors["vec"].shape == (3,)


def test_writer_streams_chunks_and_checks_sizes_and_order(tmp_path):
    w = GGUFWriter(tmp_path / "s.gguf")
    w.add_tensor_info("a", (4, 8), quants.GGML_F32)
    w.add_tensor_info("b", (3,), quants.GGML_F32)
    with pytest.raises(ValueError, match="multiple of the Q4_0 block size 32"):
        w.add_tensor_info("c", (2, 40), quants.GGML_Q4_0)
    w.write_header()
    with pytest.raises(ValueError, match="out of order"):
        w.write_tensor("b", np.zeros(3, np.float32))
    w.write_tensor("a", (np.full((1, 8), i, np.float32) for i in range(4)))
    with pytest.raises(ValueError, match="wrote 8 bytes, expected 12"):
        w.write_tensor("b", np.zeros(2, np.float32))
    w._f.close()

    w = GGUFWriter(tmp_path / "m.gguf")
    w.add_tensor_info("a", (2,), quants.GGML_F32)
    w.write_header()
    with pytest.raises(ValueError, match="never written: a"):
        w.close()


def test_header_counts_that_overflow_the_file_do_not_allocate(tmp_path):
    path = tmp_path / "huge.gguf"
    # one metadata entry: an array of 10^12 uint64, in a file of a few dozen bytes
    body = b"GGUF" + (3).to_bytes(4, "little") + (0).to_bytes(8, "little") + (1).to_bytes(8, "little")
    key = b"evil"
    body += len(key).to_bytes(8, "little") + key + (9).to_bytes(4, "little")
    body += (10).to_bytes(4, "little") + (10 ** 12).to_bytes(8, "little") + b"\0" * 64
    path.write_bytes(body)
    with pytest.raises(ModelFileError, match=r"evil claims 1000000000000 elements .* only 64 bytes"):
        read_gguf(path)
    # a count of 10^12 tensors
    path.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + (10 ** 12).to_bytes(8, "little")
                     + (0).to_bytes(8, "little") + b"\0" * 100)
    with pytest.raises(ModelFileError, match=r"1000000000000 tensors .* 100 bytes after byte 24"):
        read_gguf(path)
    # a string length of 2^62
    path.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + (0).to_bytes(8, "little")
                     + (1).to_bytes(8, "little") + (2 ** 62).to_bytes(8, "little") + b"\0" * 40)
    with pytest.raises(ModelFileError, match=rf"key of metadata entry 0 at byte 24 claims {2 ** 62} bytes"):
        read_gguf(path)


def test_version_and_truncation_messages(tmp_path):
    path = tmp_path / "v.gguf"
    path.write_bytes(b"GGUF" + (1).to_bytes(4, "little") + b"\0" * 16)
    with pytest.raises(UnsupportedModelError, match="GGUF version 1 is not supported; supported: 2, 3"):
        read_gguf(path)
    path.write_bytes(b"GGUF" + (3).to_bytes(4, "big") + b"\0" * 16)
    with pytest.raises(UnsupportedModelError, match="50331648 .*big-endian"):
        read_gguf(path)
    path.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + b"\0" * 5)
    with pytest.raises(ModelFileError, match="truncated header: reading the tensor count at byte 8 "
                                             "needs 8 bytes, the file has 13 bytes"):
        read_gguf(path)


def test_long_string_arrays_cross_the_read_buffer(tmp_path):
    """3 MiB of strings: some cross the reader's first 1 MiB buffer; all come back."""
    strings = [f"tok{i}" + "é" * (i % 7) + "x" * (100 + i % 13) for i in range(25_000)]
    path = tmp_path / "s.gguf"
    with GGUFWriter(path) as w:
        w.add("tokenizer.ggml.tokens", strings)
        w.add("after", 7)
        w.write_header()
    g = read_gguf(path)
    assert g.metadata["tokenizer.ggml.tokens"] == strings and g.metadata["after"] == 7
    assert gguf.GGUFReader(path).fields["tokenizer.ggml.tokens"].contents()[-1] == strings[-1]
