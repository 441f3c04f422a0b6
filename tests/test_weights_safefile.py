"""Safetensors header validation, pickle refusal, finite checks and atomic writes (weights/safefile.py)."""
import json
import os
import pickle
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from productbg.weights.errors import MalformedFileError, WeightsError
from productbg.weights.safefile import (MAX_HEADER_BYTES, SafeReader, atomic_save, check_finite, load_all,
                                        read_header)


def raw_file(path: Path, header: dict | bytes, body: bytes = b"", length: int | None = None) -> Path:
    """Write a safetensors-like file byte by byte (header given as dict or raw bytes)."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + body)
    return path


def entry(dtype="F32", shape=(2,), begin=0, end=8) -> dict:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, end]}


class _Touch:
    """Unpickling this creates a marker file: proof that a pickle ran code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin", ".ckpt", ".PT"])
def test_pickle_files_are_refused_unopened(tmp_path, suffix):
    """A pickle that would run code is refused by its name; the error says why and how to convert."""
    marker = tmp_path / "pwned"
    path = tmp_path / f"weights{suffix}"
    path.write_bytes(pickle.dumps(_Touch(marker)))
    with pytest.raises(WeightsError) as err:
        read_header(path)
    msg = str(err.value)
    assert "arbitrary code" in msg and "pickle" in msg.lower() and "safetensors" in msg
    assert not marker.exists()
    assert isinstance(err.value, WeightsError) and isinstance(err.value, ValueError)


@pytest.mark.parametrize("name", ["weights.json", "weights", "weights.safetensors.bak"])
def test_only_safetensors_suffix_is_read(tmp_path, name):
    """Anything not named .safetensors is refused before reading."""
    path = tmp_path / name
    save_file({"a": torch.zeros(2)}, str(path))
    with pytest.raises(WeightsError, match="only .safetensors"):
        read_header(path)


def test_valid_header_is_parsed(tmp_path):
    """Shapes, dtypes, offsets and metadata of a file written by safetensors come back as written."""
    path = tmp_path / "ok.safetensors"
    save_file({"a": torch.zeros(2, 3), "b": torch.ones(4, dtype=torch.float16)}, str(path), {"k": "v"})
    h = read_header(path)
    assert h.tensors["a"].shape == (2, 3) and h.tensors["a"].dtype == "F32"
    assert h.tensors["b"].numel == 4 and h.tensors["b"].dtype == "F16"
    assert h.metadata == {"k": "v"} and h.file_size == path.stat().st_size


@pytest.mark.parametrize("length, match", [
    (MAX_HEADER_BYTES + 1, "limit"),
    (2**63, "limit"),
    (10_000, "truncated"),
    (1, "too short"),
])
def test_absurd_or_lying_header_length(tmp_path, length, match):
    """The 8-byte length is bounded by a hard limit and by the file size before anything is allocated."""
    path = raw_file(tmp_path / "x.safetensors", {"a": entry()}, b"\0" * 8, length=length)
    with pytest.raises(MalformedFileError, match=match):
        read_header(path)


def test_file_shorter_than_length_field(tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes(b"\x05\x00")
    with pytest.raises(MalformedFileError, match="too short"):
        read_header(path)


@pytest.mark.parametrize("header, match", [
    (b"[1, 2]   ", "not a JSON object"),
    (b"{not json", "not valid UTF-8 JSON"),
    (b'{"a": \xff\xfe}', "not valid UTF-8 JSON"),
    (b"{" + b'"a":' * 3 + b"}", "not valid"),
    (b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, '
     b'"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}', "names 'a' twice"),
    (json.dumps({"__metadata__": {"k": 1}, "a": entry()}).encode(), "strings to strings"),
    (json.dumps({"__metadata__": {"k": "\ud800"}, "a": entry()}).encode(), "surrogate"),
    (b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "deep": ' + b"[" * 100000 + b"]" * 100000
     + b"}", "not valid UTF-8 JSON"),
])
def test_malformed_header_json(tmp_path, header, match):
    """Non-objects, bad UTF-8, duplicate names, non-string metadata, invalid Unicode, huge nesting."""
    path = raw_file(tmp_path / "x.safetensors", header, b"\0" * 8)
    with pytest.raises(MalformedFileError, match=match):
        read_header(path)


@pytest.mark.parametrize("bad, match", [
    (entry(dtype="Q4"), "unsupported dtype"),
    (entry(dtype=None), "unsupported dtype"),
    (entry(shape=(-2,)), "invalid shape"),
    ({"dtype": "F32", "shape": [True, True], "data_offsets": [0, 8]}, "invalid shape"),
    ({"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}, "invalid shape"),
    (entry(begin=8, end=0), "invalid data_offsets"),
    ({"dtype": "F32", "shape": [2], "data_offsets": [0]}, "invalid data_offsets"),
    (entry(shape=(3,)), "data_offsets span 8"),
    (entry(shape=(2**40, 2**40)), "data_offsets span"),
    ({"dtype": "F32", "shape": [2], "data_offsets": [0, 8], "extra": 1}, "exactly dtype"),
])
def test_bad_tensor_entries(tmp_path, bad, match):
    """Unknown dtypes, negative/bool/float dims, inverted offsets and size mismatches are caught."""
    path = raw_file(tmp_path / "x.safetensors", {"a": bad}, b"\0" * 8)
    with pytest.raises(MalformedFileError, match=match):
        read_header(path)


@pytest.mark.parametrize("tensors, body_len, match", [
    ({"a": entry(), "b": entry()}, 16, "overlap or gap"),
    ({"a": entry(), "b": entry(begin=12, end=20)}, 20, "overlap or gap"),
    ({"a": entry()}, 4, "truncated"),
    ({"a": entry()}, 12, "padded"),
])
def test_offsets_must_tile_the_data_section(tmp_path, tensors, body_len, match):
    """Overlapping tensors, gaps, truncated data and trailing bytes are all refused."""
    path = raw_file(tmp_path / "x.safetensors", tensors, b"\0" * body_len)
    with pytest.raises(MalformedFileError, match=match):
        read_header(path)


def test_truncated_real_file(tmp_path):
    """Cutting a real file anywhere gives a WeightsError."""
    path = tmp_path / "x.safetensors"
    save_file({"a": torch.randn(16)}, str(path))
    data = path.read_bytes()
    for cut in (0, 4, 8, 20, len(data) // 2, len(data) - 1):
        path.write_bytes(data[:cut])
        with pytest.raises(MalformedFileError):
            read_header(path)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nan_and_inf_are_rejected_on_read(tmp_path, dtype, bad):
    """NaN/inf anywhere in a tensor raises, naming the tensor."""
    path = tmp_path / "x.safetensors"
    t = torch.zeros(100, dtype=dtype)
    t[37] = bad
    save_file({"weights": t, "fine": torch.zeros(3)}, str(path))
    with pytest.raises(MalformedFileError, match="'weights' contains NaN or infinite"):
        load_all(path)
    tensors, _ = load_all(path, ["fine"])
    assert torch.equal(tensors["fine"], torch.zeros(3))


def test_large_finite_values_are_not_mistaken_for_inf():
    """The fast sum-based check falls back to an exact one when the sum overflows."""
    t = torch.full((4,), 3e38, dtype=torch.float32)
    assert check_finite(t, "big") is t


def test_reader_rows_and_close(tmp_path):
    """Rows are read on demand; the reader closes cleanly."""
    path = tmp_path / "x.safetensors"
    data = torch.arange(12.0).reshape(4, 3)
    save_file({"m": data}, str(path))
    with SafeReader(path) as r:
        assert torch.equal(r.rows("m", 1, 3), data[1:3])
        assert torch.equal(r.tensor("m"), data)


def test_atomic_save_replaces_and_leaves_no_temp(tmp_path):
    """atomic_save writes a complete file in one rename; nothing else is left in the folder."""
    path = tmp_path / "sub" / "w.safetensors"
    atomic_save({"a": torch.ones(3)}, path, {"k": "1"})
    atomic_save({"a": torch.zeros(5)}, path, {"k": "2"})
    assert os.listdir(path.parent) == ["w.safetensors"]
    h = read_header(path)
    assert h.tensors["a"].shape == (5,) and h.metadata["k"] == "2"


def test_atomic_save_failure_keeps_old_file(tmp_path):
    """If writing fails midway, the previous file is untouched and the temp file is removed."""
    path = tmp_path / "w.safetensors"
    atomic_save({"a": torch.ones(3)}, path)
    before = path.read_bytes()
    with pytest.raises((AttributeError, TypeError, ValueError)):
        atomic_save({"a": torch.ones(3), "b": "not a tensor"}, path)  # type: ignore[dict-item]
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["w.safetensors"]


def test_atomic_save_refuses_pickle_destination(tmp_path):
    with pytest.raises(WeightsError, match=".safetensors only"):
        atomic_save({"a": torch.ones(1)}, tmp_path / "w.pt")


def test_atomic_writers_give_files_the_usual_permissions(tmp_path):
    """Weight files, output PNGs and dataset files are readable like any file this process writes (umask), not
    mkstemp's 0600 — a ComfyUI server running as another user must be able to load a trained bank."""
    import numpy as np

    from productbg.fileio.png import save_png
    from productbg.fileio import write_bytes_atomically as atomic_write_bytes

    umask = os.umask(0o022)
    try:
        written = [atomic_save({"x": torch.zeros(2)}, tmp_path / "w.safetensors"),
                   save_png(np.zeros((4, 4, 3), np.float32), tmp_path / "o.png")]
        atomic_write_bytes(tmp_path / "d.txt", b"x")
        written.append(tmp_path / "d.txt")
    finally:
        os.umask(umask)
    assert [oct(p.stat().st_mode & 0o777) for p in written] == [oct(0o644)] * 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.txt", "o.png", "w.safetensors"]
