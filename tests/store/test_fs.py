import mmap
import os

from fsspec.implementations.local import LocalFileSystem
from fsspec.implementations.memory import MemoryFileSystem

from dictsweep.store import fs


def test_join_keeps_the_scheme():
    assert fs.join("s3://bucket/prefix", "x/y") == "s3://bucket/prefix/x/y"
    assert fs.join("s3://bucket/prefix/", "train", "00000.arrow") == "s3://bucket/prefix/train/00000.arrow"
    assert fs.join("s3://bucket", "manifest.json") == "s3://bucket/manifest.json"
    assert fs.join("/data/ds", "manifest.json") == "/data/ds/manifest.json"
    assert fs.join("relative/ds/", "a") == "relative/ds/a"
    assert fs.join("file:///data/ds", "a") == "file:///data/ds/a"


def test_resolve_local_and_other_protocols(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    filesystem, path = fs.resolve("ds/manifest.json")
    assert isinstance(filesystem, LocalFileSystem) and path == str(tmp_path / "ds" / "manifest.json")
    assert fs.resolve(f"file://{tmp_path}/x")[1] == f"{tmp_path}/x"
    filesystem, path = fs.resolve("memory://store-test/a.bin")
    assert isinstance(filesystem, MemoryFileSystem) and path == "/store-test/a.bin"


def test_write_bytes_is_atomic_locally_and_reads_back(tmp_path):
    uri = str(tmp_path / "sub" / "file.bin")
    fs.write_bytes(uri, b"hello")
    assert os.listdir(tmp_path / "sub") == ["file.bin"]  # no temporary left behind
    assert fs.read_bytes(uri) == b"hello" and fs.exists(uri)
    fs.write_text(uri, "again")
    assert fs.read_text(uri) == "again"
    fs.remove(uri)
    assert not fs.exists(uri)


def test_read_bytearray_returns_the_whole_object_whatever_the_size_hint():
    uri = "memory://store-test/sizes.bin"
    fs.write_bytes(uri, b"0123456789")
    for hint in (10, 4, 20, 0):
        data = fs.read_bytearray(uri, hint)
        assert isinstance(data, bytearray) and data == b"0123456789"


def test_read_mapped_maps_a_local_file_of_the_expected_size_and_reads_anything_else(tmp_path):
    path = tmp_path / "file.bin"
    path.write_bytes(b"0123456789")
    mapped = fs.read_mapped(str(path), 10)
    assert isinstance(mapped, mmap.mmap) and mapped[:] == b"0123456789"
    mapped[0:1] = b"X"  # copy-on-write: the file keeps its bytes
    assert path.read_bytes() == b"0123456789"
    assert fs.read_mapped(str(path), 4) == bytearray(b"0123456789")  # its real size, for the caller to report
    path.write_bytes(b"")
    assert fs.read_mapped(str(path), 0) == bytearray()
    fs.write_bytes("memory://store-test/mapped.bin", b"abc")
    assert fs.read_mapped("memory://store-test/mapped.bin", 3) == bytearray(b"abc")
