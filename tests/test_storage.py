"""RunDir on a local path and on a file:// URI (the pyarrow route that s3:// and gs:// take): round trips, atomic
writes, listing, and clear errors."""

from __future__ import annotations

import json
import os

import pyarrow.fs as pafs
import pytest
import torch
from safetensors.torch import load_file

from nullbooth.errors import NullBoothError
from nullbooth.storage import RunDir


@pytest.fixture(params=["path", "uri"])
def run(request, tmp_path) -> RunDir:
    """The same folder, given as a plain path or as a file:// URI."""
    root = tmp_path / "run"
    return RunDir(str(root) if request.param == "path" else root.as_uri())


def on_disk(run: RunDir, rel: str) -> str:
    """Where `rel` lands on the local disk, computed independently of RunDir."""
    location = run.location.removeprefix("file://")
    return os.path.join(location, *rel.split("/"))


def all_files(root: str) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, files in os.walk(root) for f in files)


def tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "down_blocks.0.attn2.to_q": torch.randn(6, 6, dtype=torch.float64, generator=g),
        "half": torch.randn(3, 5, generator=g).half(),
        "counts": torch.arange(7, dtype=torch.int64),
        "transposed": torch.randn(4, 3, generator=g).t(),  # not contiguous
    }


def test_tensors_round_trip_bit_exact_and_land_where_the_location_says(run):
    run.write_tensors("covariance/global.safetensors", tensors(), metadata={"format": "pt"})
    back = run.read_tensors("covariance/global.safetensors")
    independent = load_file(on_disk(run, "covariance/global.safetensors"))  # safetensors' own reader, from disk
    for key, value in tensors().items():
        assert back[key].dtype == value.dtype and torch.equal(back[key], value)
        assert torch.equal(independent[key], value)


def test_json_round_trips_and_is_plain_json_on_disk(run):
    manifest = {"format_version": 1, "timesteps": [999, 499, 1], "prompts": ["a café", "二"], "ok": None}
    run.write_json("covariance/manifest.json", manifest)
    assert run.read_json("covariance/manifest.json") == manifest
    with open(on_disk(run, "covariance/manifest.json"), encoding="utf-8") as f:
        assert json.load(f) == manifest


def test_writes_leave_no_temporary_files(run):
    run.write_json("a/b/c.json", [1])
    run.write_tensors("a/t.safetensors", {"x": torch.ones(2)})
    run.write_json("a/b/c.json", [2])  # overwrite in place
    assert all_files(on_disk(run, "")) == [os.path.join("a", "b", "c.json"), os.path.join("a", "t.safetensors")]
    assert run.read_json("a/b/c.json") == [2]


class FailingStream:
    """An output stream that writes part of the data, then fails like a full disk or a dropped connection."""

    def __init__(self, stream):
        self.stream = stream

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stream.close()
        return False

    def write(self, data):
        self.stream.write(bytes(data)[: len(data) // 2])
        raise OSError("simulated failure mid-stream")


class FailingWrites:
    """A filesystem proxy whose output streams fail after a partial write; everything else is the real one."""

    def __init__(self, fs: pafs.FileSystem):
        self.fs = fs
        self.opened: list[str] = []

    def open_output_stream(self, path, *args, **kwargs):
        self.opened.append(path)
        return FailingStream(self.fs.open_output_stream(path, *args, **kwargs))

    def __getattr__(self, name):
        return getattr(self.fs, name)


def test_an_interrupted_write_leaves_no_file_under_the_final_name(run, monkeypatch):
    proxy = FailingWrites(run.fs)
    monkeypatch.setattr(run, "fs", proxy)
    with pytest.raises(OSError, match="simulated failure mid-stream"):
        run.write_tensors("covariance/t0999.safetensors", tensors())
    # The partial bytes went to a temporary sibling, never to the final name, and the temporary is gone.
    assert proxy.opened and not proxy.opened[0].endswith("/covariance/t0999.safetensors")
    assert not run.exists("covariance/t0999.safetensors")
    assert all_files(on_disk(run, "")) == []


def test_an_interrupted_overwrite_keeps_the_previous_complete_file(run, monkeypatch):
    run.write_json("covariance/manifest.json", {"complete": True})
    monkeypatch.setattr(run, "fs", FailingWrites(run.fs))
    with pytest.raises(OSError):
        run.write_json("covariance/manifest.json", {"complete": False, "padding": "x" * 1000})
    monkeypatch.undo()
    assert run.read_json("covariance/manifest.json") == {"complete": True}
    assert all_files(on_disk(run, "")) == [os.path.join("covariance", "manifest.json")]


def test_exists_and_listdir(run):
    assert not run.exists("covariance") and run.listdir("covariance") == [] and run.listdir() == []
    for name in ("t0999.safetensors", "t0001.safetensors", "manifest.json"):
        run.write_bytes(f"covariance/{name}", b"{}")
    run.write_bytes("projection/global.safetensors", b"")
    assert run.exists("covariance") and run.exists("covariance/manifest.json")
    assert not run.exists("covariance/t0500.safetensors")
    assert run.listdir() == ["covariance", "projection"]
    assert run.listdir("covariance") == ["manifest.json", "t0001.safetensors", "t0999.safetensors"]
    assert run.listdir("covariance/manifest.json") == []  # a file is not a folder
    run.delete("projection")
    assert run.listdir() == ["covariance"]


def test_locations_keep_the_form_the_user_gave(run):
    assert run.uri("covariance/manifest.json") == f"{run.location}/covariance/manifest.json"
    # file:// resolves to the local filesystem, so tools that need a path (image writers) get one.
    assert run.is_local and run.local_path("lora") == on_disk(run, "lora")


def test_a_path_and_its_file_uri_are_the_same_run(tmp_path):
    RunDir(str(tmp_path)).write_json("x.json", {"from": "path"})
    assert RunDir(tmp_path.as_uri()).read_json("x.json") == {"from": "path"}


def test_missing_files_and_unknown_schemes_are_clear_errors(run):
    with pytest.raises(NullBoothError, match=f"^{run.location}/covariance/manifest.json does not exist$"):
        run.read_json("covariance/manifest.json")
    with pytest.raises(NullBoothError, match="^cannot open storage 'nosuch://bucket/run': "):
        RunDir("nosuch://bucket/run")


def test_invalid_json_and_non_safetensors_bytes_are_refused(run):
    run.write_bytes("covariance/manifest.json", b"{not json")
    with pytest.raises(NullBoothError, match=r"manifest.json is not valid JSON \("):
        run.read_json("covariance/manifest.json")
    run.write_bytes("covariance/global.safetensors", b"\x80\x04K\x01.")  # a pickle of the int 1
    with pytest.raises(NullBoothError, match=r"global.safetensors is not a valid safetensors file \("):
        run.read_tensors("covariance/global.safetensors")
