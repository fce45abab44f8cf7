"""fairseq's MMIDIDX token files and dict.txt (d2v_jax/data/fairseq_bin.py),
checked against a writer and a reader written here from fairseq's
`indexed_dataset.py` description: the 9-byte magic `MMIDIDX\\x00\\x00`, version
1 as <Q, the dtype code as <B, the record count as <Q, int32 sizes, int64
byte pointers; the records back to back in the .bin."""

import os
import struct

import numpy as np
import pytest

from d2v_jax.data import fairseq_bin as fb

from helpers import write_text

# fairseq's _code_to_dtype (the codes a reader must accept).
CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64,
         7: np.double, 8: np.uint16, 9: np.uint32, 10: np.uint64}


def reference_write(prefix, records, code):
    dtype = np.dtype(CODES[code])
    sizes, pointers, offset = [], [], 0
    with open(prefix + ".bin", "wb") as f:
        for r in records:
            f.write(np.asarray(r, dtype).tobytes())
            sizes.append(len(r))
            pointers.append(offset)
            offset += len(r) * dtype.itemsize
    with open(prefix + ".idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", code)
                + struct.pack("<Q", len(sizes)) + np.asarray(sizes, np.int32).tobytes()
                + np.asarray(pointers, np.int64).tobytes())


def reference_read(prefix):
    with open(prefix + ".idx", "rb") as f:
        assert f.read(9) == b"MMIDIDX\x00\x00" and struct.unpack("<Q", f.read(8)) == (1,)
        dtype = np.dtype(CODES[f.read(1)[0]])
        (n,) = struct.unpack("<Q", f.read(8))
        sizes = np.frombuffer(f.read(4 * n), np.int32)
        pointers = np.frombuffer(f.read(8 * n), np.int64)
    data = open(prefix + ".bin", "rb").read()
    return [np.frombuffer(data, dtype, int(s), int(p)) for s, p in zip(sizes, pointers)], dtype


def _records(rng, n, high):
    return [rng.integers(0, high, int(rng.integers(1, 9))) for _ in range(n)]


@pytest.mark.parametrize("code", [1, 4, 5, 8, 9])
def test_reads_what_fairseq_writes_at_each_dtype(tmp_path, code):
    rng = np.random.default_rng(code)
    high = min(np.iinfo(CODES[code]).max, 60000)
    records = _records(rng, 50, high)
    prefix = str(tmp_path / "train")
    reference_write(prefix, records, code)
    got = fb.IndexedTokens(prefix)
    assert len(got) == 50 and got.dtype == np.dtype(CODES[code])
    assert got.num_tokens == sum(len(r) for r in records)
    for i, r in enumerate(records):
        np.testing.assert_array_equal(got[i], r)
        assert got[i].dtype == np.int32
    flat = np.concatenate(records)
    np.testing.assert_array_equal(got.read(3, 40), flat[3:43])  # runs across records


@pytest.mark.parametrize("dtype", [np.uint16, np.int32, np.uint8])
def test_what_we_write_is_what_fairseq_reads(tmp_path, dtype):
    records = _records(np.random.default_rng(1), 30, 200)
    prefix = fb.write_indexed(str(tmp_path / "x"), records, dtype)
    back, got_dtype = reference_read(prefix)
    assert got_dtype == np.dtype(dtype) and len(back) == 30
    for a, b in zip(back, records):
        np.testing.assert_array_equal(a, b)
    assert fb.best_fitting_dtype(50265) == np.uint16 and fb.best_fitting_dtype(70000) == np.uint32


def test_split_files_and_bad_files_are_named(tmp_path):
    for name in ("train", "train1", "train2"):
        reference_write(str(tmp_path / name), [[1, 2, 3]], 8)
    reference_write(str(tmp_path / "train4"), [[1]], 8)  # after a gap: not read, as fairseq
    assert [os.path.basename(p) for p in fb.split_prefixes(str(tmp_path), "train")] == [
        "train", "train1", "train2"]
    with pytest.raises(FileNotFoundError, match=r"no valid\.bin / valid\.idx .* splits there: "
                                                r"\['train', 'train1', 'train2', 'train4'\]"):
        fb.split_prefixes(str(tmp_path), "valid")
    prefix = str(tmp_path / "train")
    idx = open(prefix + ".idx", "rb").read()
    open(prefix + ".idx", "wb").write(b"TNTIDX\x00\x00\x00" + idx[9:])
    with pytest.raises(ValueError, match=r"train\.idx: not an MMIDIDX index"):
        fb.IndexedTokens(prefix)
    open(prefix + ".idx", "wb").write(idx[:9] + struct.pack("<Q", 2) + idx[17:])
    with pytest.raises(ValueError, match=r"train\.idx: MMIDIDX version 2"):
        fb.IndexedTokens(prefix)
    open(prefix + ".idx", "wb").write(idx[:17] + bytes([11]) + idx[18:])
    with pytest.raises(ValueError, match=r"train\.idx: dtype code 11 is not one of fairseq's"):
        fb.IndexedTokens(prefix)
    open(prefix + ".idx", "wb").write(idx)
    open(prefix + ".bin", "wb").write(b"\x01\x00")  # 1 of the 3 tokens the index names
    with pytest.raises(ValueError, match=r"train\.bin: 2 bytes, shorter than its index says "
                                         r"\(6 bytes for 1 records\)"):
        fb.IndexedTokens(prefix)
    open(prefix + ".idx", "wb").write(idx[:-6])
    with pytest.raises(ValueError, match=r"train\.idx: .* the index is truncated"):
        fb.IndexedTokens(prefix)


def test_dictionary_as_fairseq_loads_it(tmp_path):
    p = write_text(tmp_path / "dict.txt", "13 850\n262 700\nfoo bar 5\n11 3 #fairseq:overwrite\n"
                                          "13 1 #fairseq:overwrite\n")
    d = fb.read_dictionary(p)
    assert d.symbols[:4] == ["<s>", "<pad>", "</s>", "<unk>"]
    assert d.symbols[4:] == ["13", "262", "foo bar", "11", "13"] and len(d) == 9
    assert d.index("13") == 8 and d.index("foo bar") == 6 and d.index("nope") == 3
    assert d.encode_line("262 13 x").tolist() == [5, 8, 3, 2] and d.mask_id == 9
    fb.write_dictionary(str(tmp_path / "out.txt"), ["a", "b"], [3, 2])
    assert open(tmp_path / "out.txt").read() == "a 3\nb 2\n"
    for content, message in (("13\n", r"x\.txt:1: '13' is not '<symbol> <count>'"),
                             ("13 1\n\n", r"x\.txt:2: '' is not"),
                             ("<unk> 4\n", r"x\.txt:1: symbol '<unk>' appears twice")):
        with pytest.raises(ValueError, match=message):
            fb.read_dictionary(write_text(tmp_path / "x.txt", content))
