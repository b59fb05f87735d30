"""Security defaults: every port of a local Ray listens on loopback only and its token file is readable by its owner
only; a run_dir is only ever read as safetensors and JSON, so a tampered manifest or a pickle dropped into a run is
refused with a clear error (and never executed); every statistics file is checked against the sha256 its manifest
records; the package itself never unpickles."""

from __future__ import annotations

import ast
import hashlib
import ipaddress
import json
import os
import pickle
import re
import shutil
import socket
import stat
import subprocess
import sys
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


# -- the ports and the token of a local Ray ------------------------------------------------------------------------
# What a local Ray may open beyond loopback, as documented in docs/operations.md ("Network exposure"): nothing.
LOCAL_EXPOSURE: set[str] = set()


def is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(address, "ipv4_mapped", None)  # "::ffff:127.0.0.1": a dual-stack socket bound to loopback
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


def listening(pids: set[int] | None = None) -> list[tuple[int, str, int]]:
    """(pid, address, port) of every listening TCP socket, of the given processes only when `pids` is given."""
    return [(c.pid, c.laddr.ip, c.laddr.port) for c in psutil.net_connections("inet")
            if c.status == psutil.CONN_LISTEN and c.pid is not None and (pids is None or c.pid in pids)]


def lan_addresses() -> list[str]:
    return [a.address for addrs in psutil.net_if_addrs().values() for a in addrs
            if a.family == socket.AF_INET and not is_loopback(a.address)]


@ray.remote
def _pid() -> int:
    return os.getpid()


def test_no_port_of_a_local_ray_listens_beyond_loopback(nullbooth_ray):
    """Every process of the Ray `connect` started (this process's children: GCS, raylet, workers, dashboard and its
    agents) listens on loopback only, the Prometheus /metrics endpoint included; the machine's own addresses answer
    on none of those ports."""
    from ray.experimental.internal_kv import _internal_kv_get

    worker = ray.get(_pid.remote())  # a worker process, with its own gRPC server
    tree = {p.pid: p.name() for p in [psutil.Process(), *psutil.Process().children(recursive=True)]}
    assert worker in tree
    sockets = listening(set(tree))
    names = {tree[pid] for pid, _, _ in sockets}
    assert {"gcs_server", "raylet"} <= names and any("DashboardAgent" in n for n in names), names
    exposed = {f"{tree[pid]} {ip}:{port}" for pid, ip, port in sockets if not is_loopback(ip)}
    assert exposed == LOCAL_EXPOSURE
    documented = "Exceptions: **none**" in (ROOT / "docs" / "operations.md").read_text()
    assert documented == (LOCAL_EXPOSURE == set())
    assert ray.util.get_node_ip_address() == "127.0.0.1"
    url = ray._private.worker.global_worker.node.address_info["webui_url"]
    assert url.rsplit(":", 1)[0] == "127.0.0.1"
    assert _internal_kv_get("dashboard", namespace="dashboard").decode() == url  # where `ray job submit` looks
    # Knocking from the network side: a port some other program on this machine opens to the network is skipped.
    others = {port for pid, ip, port in listening() if pid not in tree and not is_loopback(ip)}
    ports = sorted({port for _, _, port in sockets} - others)
    assert lan_addresses() and ports
    for ip in lan_addresses():
        for port in ports:
            with pytest.raises(OSError):
                socket.create_connection((ip, port), timeout=1).close()


def test_the_token_file_of_a_local_ray_is_readable_by_its_owner_only(nullbooth_ray):
    from nullbooth.cluster import token_file

    path = token_file()
    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_MODE", "token").lower() != "token":
        pytest.skip("this environment configures Ray's token itself")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


NEW_LOCAL_RAY = """
import json, stat, sys
import ray
from nullbooth.cluster import connect, token_file
from nullbooth.config import RayConfig
connect(RayConfig(num_cpus=1))
path = token_file()
print(json.dumps({"path": str(path), "mode": stat.S_IMODE(path.stat().st_mode),
                  "dir_mode": stat.S_IMODE(path.parent.stat().st_mode), "token": path.read_text(),
                  "node_ip": ray.util.get_node_ip_address(), "tasks": ray.get(ray.remote(lambda: 1).remote())}))
ray.shutdown()
"""


def test_a_new_local_ray_gets_a_token_file_only_its_owner_can_read(tmp_path):
    """In a fresh home (no token yet), the first local run creates ~/.ray (0700) and the token (0600) itself, in
    Ray's own form; Ray accepts it (a task runs). Ray alone would write the token with mode 0644."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS")}
    env.update(HOME=str(tmp_path), PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", NEW_LOCAL_RAY], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    info = json.loads(done.stdout.strip().splitlines()[-1])
    assert info["path"] == str(tmp_path / ".ray" / "auth_token")
    assert (info["mode"], info["dir_mode"]) == (0o600, 0o700)
    assert re.fullmatch(r"[0-9a-f]{64}", info["token"])
    assert (info["node_ip"], info["tasks"]) == ("127.0.0.1", 1)


def test_an_existing_token_file_is_narrowed_and_kept(tmp_path, monkeypatch):
    from nullbooth.cluster import secure_token_file

    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    token = tmp_path / ".ray" / "auth_token"
    token.parent.mkdir()
    token.write_text("ab" * 32)
    token.chmod(0o644)
    assert secure_token_file() == token
    assert stat.S_IMODE(token.stat().st_mode) == 0o600 and token.read_text() == "ab" * 32
    # No token involved: nothing is created.
    monkeypatch.setenv("HOME", str(tmp_path / "other"))
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert secure_token_file() is None and not (tmp_path / "other").exists()


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
