"""Security defaults: a local Ray's dashboard and job server listen on loopback only; a run_dir is only ever read as
safetensors and JSON, so a tampered manifest or a pickle dropped into a run is refused with a clear error (and
never executed); every statistics file is checked against the sha256 its manifest records; the package itself
never unpickles."""

from __future__ import annotations

import ast
import hashlib
import pickle
import shutil
import socket
from pathlib import Path

import psutil
import pytest
import ray
import torch

from nullbooth.cluster import connect
from nullbooth.config import RayConfig, load_config
from nullbooth.errors import NullBoothError
from nullbooth.storage import RunDir

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def nullbooth_ray():
    """This module's Ray is the one `nullbooth.cluster.connect` starts for a laptop run (dashboard included)."""
    if ray.is_initialized():
        ray.shutdown()
    connect(RayConfig(num_cpus=2))
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def built_run(nullbooth_ray, tmp_path_factory) -> Path:
    """A real statistics run on the tiny model: 8 prompts, 2 sampling steps, 1 collector actor."""
    from nullbooth.stats.build import build_covariance

    run_dir = tmp_path_factory.mktemp("security") / "run"
    config = load_config(ROOT / "configs" / "tiny.yaml", [
        f"run_dir={run_dir}", "preserve.max_prompts=8", "preserve.holdout=0", "sampling.num_inference_steps=2",
        "covariance.num_workers=1", "covariance.batch_size=4"])
    build_covariance(config)
    return run_dir


@pytest.fixture
def run(built_run, tmp_path) -> RunDir:
    """A private copy of the built run, free to tamper with."""
    copy = tmp_path / "run"
    shutil.copytree(built_run, copy)
    return RunDir(str(copy))


# -- the dashboard ---------------------------------------------------------------------------------------------------
def test_local_dashboard_and_job_server_listen_on_loopback_only(nullbooth_ray):
    from ray.experimental.internal_kv import _internal_kv_get

    url = ray._private.worker.global_worker.node.address_info["webui_url"]
    host, port = url.rsplit(":", 1)
    assert host == "127.0.0.1"
    # What the dashboard registered in the GCS (where `ray job submit` and the CLI look it up) ...
    assert _internal_kv_get("dashboard", namespace="dashboard").decode() == url
    # ... and what the operating system says is listening on that port: loopback, nothing on all interfaces.
    listening = {c.laddr.ip for c in psutil.net_connections("tcp")
                 if c.status == psutil.CONN_LISTEN and c.laddr.port == int(port)}
    assert listening == {"127.0.0.1"}
    # The node's own network address does not answer on the dashboard/job-server port.
    node_ip = ray.util.get_node_ip_address()
    assert node_ip != "127.0.0.1"
    with pytest.raises(OSError):
        socket.create_connection((node_ip, int(port)), timeout=2).close()


# -- tampered manifests ----------------------------------------------------------------------------------------------
def tamper(run: RunDir, edit) -> None:
    manifest = run.read_json("covariance/manifest.json")
    edit(manifest)
    run.write_json("covariance/manifest.json", manifest)


def test_the_untampered_run_reads_back(run):
    from nullbooth.stats.manifest import read_manifest
    from nullbooth.stats.store import load_bases

    manifest = read_manifest(run)
    bases = load_bases(run, manifest)
    assert set(bases) == set(manifest.layers)
    for name, basis in bases.items():  # every basis is orthonormal: UᵀU = I
        assert torch.allclose(basis.T @ basis, torch.eye(basis.shape[1], dtype=torch.float64), atol=1e-8), name


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.pop("layers"), "required field 'layers' is missing"),
    (lambda m: m.update(timesteps=[str(t) for t in m["timesteps"]]),
     "field 'timesteps' must be a non-empty list of distinct integers 0..9999"),
    (lambda m: m.update(text_rows="many"), "field 'text_rows' must be a positive integer"),
    (lambda m: next(e for e in m["layers"].values() if e["side"] == "image").update(side="text"),
     "field 'layers' must be a non-empty object layer -> {in_features: d, side: text|image}"),
    (lambda m: m["layers"].update({"__import__('os').system('x')": {"in_features": 8, "side": "image"}}),
     "field 'layers' must be a non-empty object layer -> {in_features: d, side: text|image}"),
    (lambda m: m.update(format_version=99),
     "format_version is 99, this NullBooth reads 2; rebuild the statistics (nullbooth build-cov --force)"),
    (lambda m: m.update(format_version=1),
     "made by an older NullBooth (format_version 1, which records no digests of the files; this one reads 2); "
     "rebuild the statistics (nullbooth build-cov --force)"),
    (lambda m: m["files"].popitem(),
     "field 'files' must list every covariance and projection file of the run (text, each timestep, global)"),
    (lambda m: m["files"].update({"covariance/global.safetensors": "not-a-digest"}),
     "field 'files' must be an object file -> sha256 hex digest"),
    (lambda m: m["image_rows"].pop(next(iter(m["image_rows"]))),
     "field 'image_rows' must count every image-side layer at every timestep"),
])
def test_a_tampered_manifest_is_refused_naming_the_field(run, edit, message):
    from nullbooth.stats.manifest import read_manifest

    tamper(run, edit)
    with pytest.raises(NullBoothError) as err:
        read_manifest(run)
    assert str(err.value) == f"{run.uri('covariance/manifest.json')}: {message}"


def test_a_manifest_that_is_not_json_is_refused(run):
    from nullbooth.stats.manifest import read_manifest

    run.write_bytes("covariance/manifest.json", pickle.dumps({"format_version": 1}))
    with pytest.raises(NullBoothError, match=r"/covariance/manifest.json is not valid JSON \("):
        read_manifest(run)


def test_the_statistics_stage_refuses_to_reuse_a_tampered_run(run):
    from nullbooth.stats.build import build_covariance

    tamper(run, lambda m: m.pop("prompts"))
    config = load_config(ROOT / "configs" / "tiny.yaml", [
        f"run_dir={run.location}", "preserve.max_prompts=8", "preserve.holdout=0", "sampling.num_inference_steps=2",
        "covariance.num_workers=1", "covariance.batch_size=4"])
    with pytest.raises(NullBoothError) as err:
        build_covariance(config)
    assert str(err.value) == (f"{run.uri('covariance/manifest.json')}: required field 'prompts' is missing; "
                              "pass --force to rebuild the statistics")


# -- pickles in run_dir ----------------------------------------------------------------------------------------------
class Payload:
    """Unpickling this runs code: it creates the marker file. A reader that unpickles would leave the marker."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def record_digest(run: RunDir, rel: str) -> None:
    """What an attacker who also edits the manifest would do: record the tampered file's digest."""
    tamper(run, lambda m: m["files"].update({rel: hashlib.sha256(run.read_bytes(rel)).hexdigest()}))


@pytest.mark.parametrize("with_digest", [False, True], ids=["digest-mismatch", "digest-updated"])
@pytest.mark.parametrize("rel", ["covariance/global.safetensors", "projection/global.safetensors",
                                 "covariance/text.safetensors"])
def test_a_pickle_under_a_safetensors_name_is_refused_and_never_executed(run, tmp_path, rel, with_digest):
    from nullbooth.stats.manifest import read_manifest
    from nullbooth.stats.store import load_bases, load_layer_covariances

    marker = tmp_path / "unpickled"
    run.write_bytes(rel, pickle.dumps({"cov": Payload(marker)}))
    if with_digest:
        record_digest(run, rel)
    manifest = read_manifest(run)
    reader = load_bases if rel.startswith("projection/") else load_layer_covariances
    with pytest.raises(NullBoothError) as err:
        reader(run, manifest, "global")
    if with_digest:
        assert str(err.value).startswith(f"{run.uri(rel)} is not a valid safetensors file (")
    else:
        assert str(err.value) == changed_message(run, rel)
    assert not marker.exists()


def changed_message(run: RunDir, rel: str) -> str:
    return (f"{run.uri(rel)}: its content does not match the sha256 recorded in {run.uri('covariance/manifest.json')} "
            "(the file changed after the statistics were written); rebuild the statistics (nullbooth build-cov --force)")


def corrupt_values(run: RunDir, rel: str) -> None:
    """A still well-formed safetensors file whose numbers changed (a bit flip, a bad copy, an edit)."""
    tensors = run.read_tensors(rel)
    key = next(iter(tensors))
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] += 1.0
    run.write_tensors(rel, tensors)


def test_every_file_is_listed_with_its_sha256_in_the_manifest(run):
    from nullbooth.stats.manifest import read_manifest

    manifest = read_manifest(run)
    on_disk = sorted(f"{d}/{name}" for d in ("covariance", "projection") for name in run.listdir(d)
                     if name.endswith(".safetensors"))
    assert sorted(manifest.files) == on_disk and len(on_disk) == 2 * (len(manifest.timesteps) + 2)
    assert manifest.files == {rel: hashlib.sha256(run.read_bytes(rel)).hexdigest() for rel in on_disk}


@pytest.mark.parametrize("rel", ["covariance/global.safetensors", "projection/text.safetensors"])
def test_a_file_whose_numbers_changed_is_refused_when_read(run, rel):
    from nullbooth.stats.manifest import read_manifest
    from nullbooth.stats.store import (
        load_bases,
        load_layer_covariances,
        read_covariance,
        read_projection,
    )

    corrupt_values(run, rel)
    manifest = read_manifest(run)
    loader, reader = ((load_bases, read_projection) if rel.startswith("projection/")
                      else (load_layer_covariances, read_covariance))
    which = rel.rsplit("/", 1)[1].split(".")[0]
    for read in (lambda: loader(run, manifest, "global"), lambda: reader(run, which, manifest)):
        with pytest.raises(NullBoothError) as err:
            read()
        assert str(err.value) == changed_message(run, rel)


def test_build_cov_refuses_to_reuse_a_run_with_a_corrupt_file_and_force_rebuilds_it(run):
    """A file that changed is not "reused complete run": one line naming it, before any actor starts, nothing
    touched; --force rebuilds the statistics (whose digests then match again)."""
    from nullbooth.stats.build import build_covariance
    from nullbooth.stats.manifest import changed_files, read_manifest

    rel = sorted(r for r in read_manifest(run).files if r.startswith("covariance/t"))[0]
    corrupt_values(run, rel)
    root = Path(run.root)
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    config = load_config(ROOT / "configs" / "tiny.yaml", [
        f"run_dir={run.location}", "preserve.max_prompts=8", "preserve.holdout=0", "sampling.num_inference_steps=2",
        "covariance.num_workers=1", "covariance.batch_size=4"])
    with pytest.raises(NullBoothError) as err:
        build_covariance(config)
    assert str(err.value) == changed_message(run, rel)
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == before
    summary = build_covariance(config, force=True)
    assert summary["reused"] is False
    assert changed_files(run, read_manifest(run)) == []
    assert build_covariance(config)["reused"] is True  # now a matching, intact run


def test_torch_save_output_and_truncated_files_are_refused(run):
    from nullbooth.stats.store import read_covariance

    data = run.read_bytes("covariance/global.safetensors")
    run.write_bytes("covariance/global.safetensors", data[: len(data) // 2])
    with pytest.raises(NullBoothError, match=r"global.safetensors is not a valid safetensors file \("):
        read_covariance(run, "global")
    torch.save({"cov": torch.eye(3)}, run.local_path("covariance/text.safetensors"))  # a zip of pickles
    with pytest.raises(NullBoothError, match=r"text.safetensors is not a valid safetensors file \("):
        read_covariance(run, "text")


def test_a_safetensors_file_with_the_wrong_shapes_is_refused(run):
    from nullbooth.stats.manifest import read_manifest
    from nullbooth.stats.store import load_layer_covariances

    manifest = read_manifest(run)
    layer, entry = next((n, e) for n, e in manifest.layers.items() if e["side"] == "image")
    tensors = run.read_tensors("covariance/global.safetensors")
    tensors[layer] = torch.zeros(2, 2)
    run.write_tensors("covariance/global.safetensors", tensors)
    record_digest(run, "covariance/global.safetensors")  # past the digest check: the shapes are checked too
    manifest = read_manifest(run)
    with pytest.raises(NullBoothError) as err:
        load_layer_covariances(run, manifest, "global")
    d = entry["in_features"]
    assert str(err.value) == (f"{run.uri('covariance/global.safetensors')}: tensor {layer!r} has shape (2, 2), "
                              f"the manifest says ({d}, {d})")


# -- the code never unpickles ----------------------------------------------------------------------------------------
UNPICKLERS = {"pickle", "cPickle", "_pickle", "cloudpickle", "dill", "joblib", "marshal", "shelve"}


def unsafe_loads(source: str) -> list[str]:
    """Calls that can execute code from data: pickle-family loads, torch.load without weights_only=True,
    numpy loads with allow_pickle=True, yaml.load / yaml.unsafe_load / yaml.full_load."""
    found = []
    aliases: dict[str, str] = {}  # local name -> "module.function" for `from pickle import load as x`
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
            name = f"{func.value.id}.{func.attr}"
        elif isinstance(func, ast.Name):
            name = aliases.get(func.id, func.id)
        else:
            continue
        module, _, attr = name.rpartition(".")
        keywords = {k.arg: k.value for k in node.keywords}
        line = f"line {node.lineno}: {name}(...)"
        if module in UNPICKLERS and attr in {"load", "loads", "Unpickler", "open"}:
            found.append(line)
        elif module == "torch" and attr == "load":
            weights_only = keywords.get("weights_only")
            if not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
                found.append(line + " without weights_only=True")
        elif module in {"np", "numpy"} and attr == "load":
            allow = keywords.get("allow_pickle")
            if allow is not None and not (isinstance(allow, ast.Constant) and allow.value is False):
                found.append(line + " with allow_pickle")
        elif module == "yaml" and attr in {"load", "unsafe_load", "full_load", "load_all", "unsafe_load_all"}:
            found.append(line)
    return found


def test_the_checker_finds_every_kind_of_unsafe_load():
    source = """
import pickle, torch, yaml, numpy as np
from pickle import loads as unpack
pickle.load(f); unpack(b); torch.load(p); torch.load(p, weights_only=False); np.load(p, allow_pickle=True)
yaml.load(s); torch.load(p, weights_only=True); np.load(p); yaml.safe_load(s); json.load(f)
"""
    assert [hit.split(": ", 1)[1] for hit in unsafe_loads(source)] == [
        "pickle.load(...)", "pickle.loads(...)", "torch.load(...) without weights_only=True",
        "torch.load(...) without weights_only=True", "np.load(...) with allow_pickle", "yaml.load(...)"]


def test_the_package_and_jobs_never_unpickle():
    files = sorted([*(ROOT / "nullbooth").rglob("*.py"), *(ROOT / "jobs").rglob("*.py")])
    assert len(files) > 10
    offenders = {str(f.relative_to(ROOT)): hits for f in files if (hits := unsafe_loads(f.read_text()))}
    assert offenders == {}
