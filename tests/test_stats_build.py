"""Stage 1 end to end on a local Ray (2 CPUs, tiny models): the distributed sums against a single-process
reference computed here with independent hooks, 1 vs 2 actors, an actor lost while sampling and one lost during
the reduction, reuse / refusal / --force, the readers later stages use, a tampered manifest, and the LCM backend."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from stats_reference import raw_sums, reference, rel_err

from nullbooth.config import load_config
from nullbooth.errors import NullBoothError
from nullbooth.stats import manifest as manifest_module
from nullbooth.stats import store
from nullbooth.stats.build import build_covariance
from nullbooth.stats.moments import unpack
from nullbooth.storage import RunDir

ROOT = Path(__file__).resolve().parent.parent
BASE = ["preserve.max_prompts=16", "preserve.holdout=4", "covariance.batch_size=3", "sampling.num_inference_steps=3",
        "covariance.product_dtype=float64", "covariance.dtype=float64", "covariance.eigh_group_size=32",
        "covariance.num_workers=2"]


def make_config(run_dir, *extra, yaml="tiny.yaml"):
    return load_config(ROOT / "configs" / yaml, [f"run_dir={run_dir}", *BASE, *extra])


# -- shared runs -----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def base(ray_local, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("stats") / "base"
    config = make_config(run_dir)
    summary = build_covariance(config)
    return config, run_dir, summary


@pytest.fixture(scope="module")
def ref(base):
    return reference(base[0])


def test_distributed_equals_single_process_reference(base, ref):
    _, run_dir, summary = base
    manifest, sums = raw_sums(run_dir)
    assert manifest.timesteps == ref["plan"]
    assert manifest.model["fingerprint"] == ref["fingerprint"]
    assert manifest.text_rows == ref["text_rows"] == 12 * 32 * 2  # prompts × tokens × (cond + negative)
    assert rel_err(sums["text"], ref["text_sum"]) < 1e-12
    image_layers = set(manifest.image_layers)
    assert set(ref["sums"]) == set(ref["plan"])
    for t in ref["plan"]:
        assert set(ref["sums"][t]) == image_layers
        for name in image_layers:
            assert manifest.image_rows[str(t)][name] == ref["rows"][t][name]
            assert rel_err(sums[(t, name)], ref["sums"][t][name]) < 1e-12, (t, name)
    # The global covariance is the mean over timesteps of the per-timestep means.
    glob = store.read_covariance(RunDir(str(run_dir)), "global")
    for name in image_layers:
        mean = sum(ref["sums"][t][name] / ref["rows"][t][name] for t in ref["plan"]) / len(ref["plan"])
        assert rel_err(glob[name], mean) < 1e-12
    assert summary["prompts"] == 12 and summary["holdout_prompts"] == 4 and not summary["reused"]


def test_float32_products_error_against_float64(ref):
    """The default product dtype: XᵀX in float32 per batch, added in float64 — measured against all-float64."""
    ks = ref["float32"]
    worst = max(rel_err(unpack(ks.image_sums[t][n].numpy()), ref["sums"][t][n]) for t in ref["plan"]
                for n in ref["sums"][t])
    print(f"float32 products: worst relative Frobenius error {worst:.2e}")
    assert 0 < worst < 1e-6
    assert all(ks.image_rows[t][n] == ref["rows"][t][n] for t in ref["plan"] for n in ref["sums"][t])


def test_one_actor_gives_the_same_sums(base, tmp_path):
    _, run_dir, _ = base
    build_covariance(make_config(tmp_path / "one", "covariance.num_workers=1"))
    m1, one = raw_sums(tmp_path / "one")
    m2, two = raw_sums(run_dir)
    assert m1.image_rows == m2.image_rows and m1.text_rows == m2.text_rows
    assert one.keys() == two.keys()
    assert all(rel_err(one[k], two[k]) < 1e-12 for k in one)


@pytest.fixture(scope="module")
def failed_and_forced(base, tmp_path_factory):
    """A copy of the base run (plus a stale file) rebuilt with --force, another threshold and an actor that dies."""
    _, run_dir, _ = base
    copy = tmp_path_factory.mktemp("forced") / "run"
    shutil.copytree(run_dir, copy)
    (copy / "covariance" / "t0999.safetensors").write_bytes(b"stale")
    config = make_config(copy, "covariance.fail_after_batches=2", "projection.threshold.kind=energy",
                         "projection.threshold.value=1e-4")
    summary = build_covariance(config, force=True)
    return copy, summary


def test_actor_failure_gives_the_same_sums_and_counts(base, failed_and_forced):
    copy, summary = failed_and_forced
    assert summary["actor_failures"] == 1
    m1, failed = raw_sums(copy)
    m2, clean = raw_sums(base[1])
    assert m1.text_rows == m2.text_rows and m1.image_rows == m2.image_rows
    assert failed.keys() == clean.keys()
    assert all(rel_err(failed[k], clean[k]) < 1e-12 for k in failed)


@pytest.fixture(scope="module")
def lost_in_reduction(base, tmp_path_factory):
    """The base config with actor 0 dying during its 2nd addition of a peer's sums: with 2 actors, while it adds
    actor 1's sums of the first timestep into its buffer, after the text side was reduced and released."""
    run_dir = tmp_path_factory.mktemp("lost-in-reduction") / "run"
    return run_dir, build_covariance(make_config(run_dir, "covariance.fail_in_reduction=2"))


def test_an_actor_lost_during_the_reduction_gives_the_same_sums_and_counts(base, lost_in_reduction):
    """The dead actor's buffer held actor 1's sums of that timestep; actor 1 still has its own. The driver replaces
    actor 0, redoes its batches (for the keys not yet reduced) and reduces that timestep again: every covariance and
    count equals the clean run's, so nothing was lost or counted twice."""
    run_dir, summary = lost_in_reduction
    assert summary["actor_failures"] == 1
    m1, lost = raw_sums(run_dir)
    m2, clean = raw_sums(base[1])
    assert m1.text_rows == m2.text_rows and m1.image_rows == m2.image_rows
    assert lost.keys() == clean.keys()
    assert all(rel_err(lost[k], clean[k]) < 1e-12 for k in lost)


def test_force_overwrites_a_different_run_completely(failed_and_forced):
    copy, _ = failed_and_forced
    manifest = manifest_module.read_manifest(RunDir(str(copy)))
    assert manifest.threshold == {"kind": "energy", "value": 1e-4}
    assert not (copy / "covariance" / "t0999.safetensors").exists()
    expected = {f"t{t:04d}.safetensors" for t in manifest.timesteps} | {"text.safetensors", "global.safetensors"}
    assert {p.name for p in (copy / "covariance").iterdir()} == expected | {"manifest.json"}
    assert {p.name for p in (copy / "projection").iterdir()} == expected


def test_a_different_config_is_refused_before_any_work(base):
    _, run_dir, _ = base
    before = (run_dir / "covariance" / "manifest.json").read_bytes()
    other = make_config(run_dir, "sampling.num_inference_steps=4", "projection.threshold.value=0.01")
    with pytest.raises(NullBoothError) as err:
        build_covariance(other)
    message = str(err.value)
    assert "pass --force" in message
    assert "sampling.num_inference_steps: run has 3, config has 4" in message
    assert "projection.threshold.value: run has 0.001, config has 0.01" in message
    assert "timesteps: run has" in message
    assert (run_dir / "covariance" / "manifest.json").read_bytes() == before


def test_matching_run_is_reused_and_another_model_refused(base, tmp_path):
    config, run_dir, _ = base
    stamps = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")}
    summary = build_covariance(config)
    assert summary["reused"] and summary["text_rows"] == 12 * 32 * 2
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")} == stamps
    # Same config, different weights: the fingerprint in the manifest no longer matches the model.
    copy = tmp_path / "other-model"
    shutil.copytree(run_dir, copy)
    manifest = json.loads((copy / "covariance" / "manifest.json").read_text())
    manifest["model"]["fingerprint"] = "0123456789abcdef"
    (copy / "covariance" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(NullBoothError, match="model fingerprint: run was built on UNet 0123456789abcdef"):
        build_covariance(make_config(copy))


def test_a_matching_run_with_a_lost_file_is_rebuilt(base, tmp_path, caplog):
    _, run_dir, _ = base
    copy = tmp_path / "lost"
    shutil.copytree(run_dir, copy)
    (copy / "projection" / "global.safetensors").unlink()
    summary = build_covariance(make_config(copy, "covariance.num_workers=1"))
    assert not summary["reused"]
    assert "lacks 1 statistics files (e.g. projection/global.safetensors); rebuilding" in caplog.text
    m1, rebuilt = raw_sums(copy)
    m2, original = raw_sums(run_dir)
    assert m1.null_dims == m2.null_dims and all(rel_err(rebuilt[k], original[k]) < 1e-12 for k in original)
    assert manifest_module.missing_files(RunDir(str(copy)), m1) == []


def test_bases_and_covariances_for_every_protected_layer(base, ref):
    _, run_dir, _ = base
    run = RunDir(str(run_dir))
    manifest = manifest_module.read_manifest(run)
    text_basis = store.read_projection(run, "text")["basis"]
    for which in ["global", *manifest.timesteps]:
        bases = store.load_bases(run, manifest, which)
        covs = store.load_layer_covariances(run, manifest, which)
        assert set(bases) == set(covs) == set(manifest.layers)
        for name, entry in manifest.layers.items():
            d, u, c = entry["in_features"], bases[name], covs[name]
            assert u.dtype == c.dtype == torch.float64 and c.shape == (d, d)
            if entry["side"] == "text":
                assert torch.equal(u, text_basis.double())
                assert rel_err(c, ref["text_sum"] / ref["text_rows"]) < 1e-12
            else:
                dims = manifest.null_dims
                k = dims["global"][name] if which == "global" else dims["timesteps"][str(which)][name]
                assert u.shape == (d, k)
            assert torch.allclose(u.T @ u, torch.eye(u.shape[1], dtype=torch.float64), atol=1e-10)
            # U spans directions the preserved keys barely reach: tr(UᵀCU) ≤ k·τ
            assert float(torch.trace(u.T @ c @ u)) <= u.shape[1] * 1e-3 * float(torch.linalg.eigvalsh(c).max()) + 1e-12
    with pytest.raises(NullBoothError, match="timestep 5 is not one of the run's collected timesteps"):
        store.load_bases(run, manifest, 5)


@pytest.mark.parametrize("tamper, message", [
    (lambda m: m.pop("timesteps"), "required field 'timesteps' is missing"),
    (lambda m: m.update(text_rows="many"), "field 'text_rows' must be a positive integer"),
    (lambda m: m.update(format_version=99), "format_version is 99"),
    (lambda m: m["layers"][next(iter(m["layers"]))].update(side="text"), "field 'layers' must be"),
    (lambda m: m["layers"].update({"../../etc/passwd": {"in_features": 4, "side": "image"}}), "field 'layers' must be"),
    (lambda m: next(iter(m["image_rows"].values())).popitem(), "field 'image_rows' must count every image-side layer"),
    (lambda m: m["null_dims"]["timesteps"].popitem(), "field 'null_dims' must list every image-side layer"),
    (lambda m: m.update(plan=m["plan"][:-1]), "field 'plan' must be the sampler's plan"),
    (lambda m: m.update(plan=list(reversed(m["plan"]))), "field 'plan' must be the sampler's plan"),
    (lambda m: m.update(timesteps=m["timesteps"] + m["timesteps"][-1:]), "field 'timesteps' must be a non-empty "
                                                                          "list of distinct integers"),
])
def test_a_tampered_manifest_is_refused(base, tmp_path, tamper, message):
    _, run_dir, _ = base
    shutil.copytree(run_dir / "covariance", tmp_path / "covariance")
    path = tmp_path / "covariance" / "manifest.json"
    manifest = json.loads(path.read_text())
    tamper(manifest)
    path.write_text(json.dumps(manifest))
    with pytest.raises(NullBoothError, match=message.replace("(", r"\(").replace(")", r"\)")):
        manifest_module.read_manifest(RunDir(str(tmp_path)))


def test_manifest_that_is_not_json_or_lies_about_shapes(base, tmp_path):
    _, run_dir, _ = base
    shutil.copytree(run_dir, tmp_path / "run")
    path = tmp_path / "run" / "covariance" / "manifest.json"
    manifest = json.loads(path.read_text())
    path.write_text("{not json")
    with pytest.raises(NullBoothError, match="manifest.json is not valid JSON"):
        manifest_module.read_manifest(RunDir(str(tmp_path / "run")))
    name = next(n for n, e in manifest["layers"].items() if e["side"] == "image")
    manifest["null_dims"]["global"][name] += 1
    path.write_text(json.dumps(manifest))
    run = RunDir(str(tmp_path / "run"))
    with pytest.raises(NullBoothError, match=f"tensor '{name}.basis' has shape"):
        store.load_bases(run, manifest_module.read_manifest(run), "global")


def test_lcm_backend_matches_its_reference(ray_local, tmp_path):
    config = make_config(tmp_path / "lcm", "sampling.num_inference_steps=2", "preserve.max_prompts=10",
                         "covariance.num_workers=1", yaml="tiny-lcm.yaml")
    build_covariance(config)
    expected = reference(config)
    manifest, sums = raw_sums(tmp_path / "lcm")
    assert manifest.backend == "lcm" and manifest.uses_guidance is False
    assert manifest.scheduler["class"] == "LCMScheduler" and manifest.timesteps == expected["plan"]
    assert manifest.text_rows == expected["text_rows"] == 6 * 32  # no negative branch
    assert rel_err(sums["text"], expected["text_sum"]) < 1e-12
    for t in expected["plan"]:
        for name, s in expected["sums"][t].items():
            assert manifest.image_rows[str(t)][name] == expected["rows"][t][name]
            assert rel_err(sums[(t, name)], s) < 1e-12


# -- null spaces that come out empty, and errors raised inside the actors --------------------------------------------
SMALL = ["preserve.max_prompts=6", "preserve.holdout=2", "covariance.batch_size=2", "sampling.num_inference_steps=1",
         "covariance.num_workers=1", "covariance.eigh_group_size=64", "covariance.dtype=float64"]


def small_config(run_dir, *extra):
    return load_config(ROOT / "configs" / "tiny.yaml", [f"run_dir={run_dir}", *SMALL, *extra])


def files_under(run_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.is_file()) if run_dir.exists() else []


def test_every_null_space_empty_is_an_error_and_removes_what_was_written(ray_local, tmp_path):
    # to_out.0 sees full-rank keys here: no eigenvalue is ≤ 1e-6, so no layer keeps a null space.
    config = small_config(tmp_path / "run", "covariance.layers=[attn2.to_out.0]",
                         "projection.threshold.kind=absolute", "projection.threshold.value=1e-6")
    with pytest.raises(NullBoothError, match="projection.threshold: with kind=absolute value=1e-06 every protected "
                                             "layer has an empty null space"):
        build_covariance(config)
    assert files_under(tmp_path / "run") == []
    assert not (tmp_path / "run" / "covariance").exists() and not (tmp_path / "run" / "projection").exists()


def test_some_empty_null_spaces_are_warnings(ray_local, tmp_path):
    config = small_config(tmp_path / "run", "covariance.layers=[attn2.to_q, attn2.to_out.0]",
                         "projection.threshold.kind=absolute", "projection.threshold.value=1e-6")
    summary = build_covariance(config)
    run = RunDir(str(tmp_path / "run"))
    manifest = manifest_module.read_manifest(run)
    covs = store.load_layer_covariances(run, manifest, "global")
    empty = sorted(n for n, k in manifest.null_dims["global"].items() if k == 0)
    assert 0 < len(empty) < len(manifest.layers)  # the case this test is about: some, not all
    for name in manifest.layers:
        smallest = float(torch.linalg.eigvalsh(covs[name]).min())
        assert (name in empty) == (smallest > 1e-6), name  # empty exactly where every eigenvalue exceeds τ
    warned = sorted(w.split(":")[0] for w in summary["warnings"] if "empty null space" in w)
    assert warned == empty


def test_an_error_inside_an_actor_reaches_the_user_as_one_message(ray_local, tmp_path):
    """Where the driver cannot see the model (it exists only on the workers), the actor's own check speaks."""
    import ray

    from nullbooth.errors import user_error
    from nullbooth.stats.collector import Collector

    config = small_config(tmp_path / "run", "covariance.layers=[attn2.to_qq]")
    actor = ray.remote(Collector).options(num_cpus=1).remote(config, 0)
    with pytest.raises(Exception) as err:
        ray.get(actor.describe.remote())
    found = user_error(err.value)
    assert found is not None and str(found).startswith("covariance.layers: pattern 'attn2.to_qq' matches no linear")
    ray.kill(actor)


# -- a sampler whose plan repeats timesteps ----------------------------------------------------------------------------
def test_a_plan_that_repeats_timesteps_builds_with_call_weighted_global_covariance(ray_local, tmp_path):
    """dpm++2m-karras at 50 steps calls the UNet twice at t=1. Each distinct timestep is one key holding every call
    at it; the global covariance weights it by its calls (stats/moments.py), which makes it Σ xxᵀ / n over every key
    of the trajectory. Checked against the independent single-process reference and the plan counted here."""
    from collections import Counter

    from safetensors.torch import load_file

    config = make_config(tmp_path / "run", "sampling.scheduler=dpm++2m-karras", "sampling.num_inference_steps=50",
                         "preserve.max_prompts=4", "preserve.holdout=1", "covariance.batch_size=2",
                         "covariance.eigh_group_size=128", "covariance.layers=[attn2.to_q]")
    summary = build_covariance(config)
    expected = reference(config)
    plan = expected["plan"]
    calls = Counter(plan)
    assert len(plan) == 50 and plan[-3:] == [1, 1, 0] and calls[1] == 2 and len(calls) == 49  # the case at hand
    run = RunDir(str(tmp_path / "run"))
    manifest = manifest_module.read_manifest(run)
    assert manifest.plan == plan and manifest.timesteps == list(dict.fromkeys(plan))
    assert sorted(p.name for p in (tmp_path / "run" / "covariance").glob("t[0-9]*")) == sorted(
        f"t{t:04d}.safetensors" for t in calls)
    per_t = {t: load_file(str(tmp_path / "run" / "covariance" / f"t{t:04d}.safetensors")) for t in calls}
    glob = load_file(str(tmp_path / "run" / "covariance" / "global.safetensors"))
    for name in manifest.image_layers:
        rows = {t: manifest.image_rows[str(t)][name] for t in calls}
        assert rows[1] == 2 * rows[999] == expected["rows"][1][name]  # both calls at t=1 are in its one key
        for t in calls:
            assert rel_err(per_t[t][name] * rows[t], expected["sums"][t][name]) < 1e-12, (t, name)
        by_calls = sum(calls[t] * per_t[t][name] for t in calls) / len(plan)
        all_keys = sum(expected["sums"][t][name] for t in calls) / sum(rows.values())  # Σ xxᵀ / n, whole trajectory
        distinct = sum(per_t[t][name] for t in calls) / len(calls)
        assert rel_err(glob[name], by_calls) < 1e-12 and rel_err(glob[name], all_keys) < 1e-12
        assert rel_err(glob[name], distinct) > 1e-4  # the rule is visible: not the mean over distinct timesteps
    assert "1 ×2" in summary_text(summary)
    assert build_covariance(config)["reused"]  # the manifest check accepts its own plan


def summary_text(summary) -> str:
    from nullbooth.stats.summary import format_summary

    return format_summary(summary)
