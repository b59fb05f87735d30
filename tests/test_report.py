"""The report: report.json follows its schema and carries exactly the numbers of its sources, the plots are PNGs,
report.md links resolve, and `compare_runs` tabulates two runs. Samples are drawn in-process (no Ray needed)."""

import copy
import csv
import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from run_fixtures import make_lora, write_fake_statistics, write_train_report
from safetensors.torch import load_file

from nullbooth.cli import main as cli_main
from nullbooth.config import load_config
from nullbooth.errors import NullBoothError
from nullbooth.models.sampler import apply_lora, load_sampling_pipeline, sample_batch
from nullbooth.report.compare import compare_runs
from nullbooth.report.generate import write_samples
from nullbooth.report.plan import PromptSamples, instance_variants, seeds_for
from nullbooth.report.schema import check_report
from nullbooth.report.write import write_report
from nullbooth.storage import RunDir

HOLDOUT = ["a wooden chair by a window", "a bowl of ramen on a table"]


def make_run(root: Path, name: str, b_std: float, mode: str, train_scale: float | None, stats: bool = True,
             baseline: str | None = None) -> tuple:
    """A run_dir with a LoRA, optional statistics and training report, its samples and its report."""
    run_dir = root / name
    overrides = [f"run_dir={run_dir}", "sampling.num_inference_steps=2", f"projection.mode={mode}"]
    if baseline:
        overrides.append(f"generate.baseline_run={baseline}")
    config = load_config(None, overrides)
    make_lora(config.model.path, run_dir / "lora", b_std=b_std, seed=1)
    manifest = write_fake_statistics(run_dir, HOLDOUT) if stats else None
    train = write_train_report(run_dir, mode, train_scale) if train_scale is not None else None
    plan = [(p, "instance") for p in instance_variants(config.train.instance_prompt)[:2]]
    plan += [(p, "holdout") for p in HOLDOUT] + [("a custom prompt", "custom")]
    rows = [(j, p, s) for j, (p, _) in enumerate(plan) for s in seeds_for(config, j)]
    pipe = load_sampling_pipeline(config)
    base = sample_batch(config, pipe, [p for _, p, _ in rows], [s for _, _, s in rows])
    apply_lora(pipe, str(run_dir / "lora"))
    tuned = sample_batch(config, pipe, [p for _, p, _ in rows], [s for _, _, s in rows])
    samples = [PromptSamples(p, k) for p, k in plan]
    for r, (j, _, seed) in enumerate(rows):
        samples[j].seeds.append(seed)
        samples[j].base.append(base[0][r])
        samples[j].base_latents.append(base[1][r])
        samples[j].finetuned.append(tuned[0][r])
        samples[j].finetuned_latents.append(tuned[1][r])
    run = RunDir(str(run_dir))
    write_samples(run, samples)
    summary = write_report(config, run, samples)
    report = json.loads((run_dir / "report" / "report.json").read_text())
    return run_dir, report, summary, manifest, train


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    none = make_run(root, "none", b_std=0.4, mode="none", train_scale=0.3)
    glob = make_run(root, "global", b_std=0.1, mode="global", train_scale=0.01, baseline=str(none[0]))
    bare = make_run(root, "bare", b_std=0.1, mode="global", train_scale=None, stats=False)
    return {"none": none, "global": glob, "bare": bare}


def test_report_json_follows_schema_and_carries_its_sources(runs):
    run_dir, report, summary, manifest, train = runs["global"]
    check_report(report)
    # Null-space dimensions are the manifest's.
    ns = report["null_space"]
    assert ns["text"]["dim"] == manifest.null_dims["text"] and ns["timesteps"] == manifest.timesteps
    for name, entry in ns["layers"].items():
        assert entry["global"] == manifest.null_dims["global"][name]
        assert entry["per_timestep"] == {str(t): manifest.null_dims["timesteps"][str(t)][name]
                                         for t in manifest.timesteps}
    assert sorted(ns["layers"]) + sorted(ns["text"]["layers"]) == sorted(
        [n for n, e in manifest.layers.items() if e["side"] == "image"]) + sorted(
        [n for n, e in manifest.layers.items() if e["side"] == "text"])
    # Preservation errors are training's; the baseline's come from the baseline run.
    p = report["preservation"]
    errors = train["preservation"]
    assert (p["mode"], p["overall"], p["max"], p["per_layer"]) == ("global", errors["overall"], errors["max"],
                                                                  errors["per_layer"])
    assert p["per_timestep"] == {t: v["overall"] for t, v in errors["per_timestep"].items()}
    base_train = runs["none"][4]
    assert report["baseline"]["mode"] == "none"
    assert report["baseline"]["preservation_overall"] == base_train["preservation"]["overall"]
    assert report["baseline"]["drift_holdout"] == runs["none"][1]["drift"]["holdout"]
    assert summary["drift"] == report["drift"]["holdout"]


def test_drift_numbers_recomputed_from_the_written_files(runs):
    run_dir, report, *_ = runs["global"]
    latents = load_file(str(run_dir / "samples" / "latents.safetensors"))
    row = 0
    for entry in report["prompts"]:
        latent, pixel = [], []
        for b_file, t_file in zip(entry["base"], entry["finetuned"]):
            b = np.asarray(Image.open(run_dir / b_file), dtype=np.float64)
            t = np.asarray(Image.open(run_dir / t_file), dtype=np.float64)
            pixel.append(((t - b) ** 2).mean())
            latent.append(((latents["finetuned"][row].double() - latents["base"][row].double()) ** 2).mean().item())
            row += 1
        assert entry["latent_mse"] == pytest.approx(np.mean(latent), rel=1e-9)
        assert entry["pixel_mse"] == pytest.approx(np.mean(pixel), rel=1e-9)
        assert entry["pixel_psnr_db"] == pytest.approx(10 * np.log10(255 ** 2 / np.mean(pixel)), rel=1e-9)
        assert entry["latent_mse"] > 0
    held = [e for e in report["prompts"] if e["kind"] == "holdout"]
    assert [e["prompt"] for e in held] == HOLDOUT
    mean = report["drift"]["holdout"]
    assert mean["prompts"] == 2 and mean["latent_mse"] == pytest.approx(np.mean([e["latent_mse"] for e in held]))
    pixel = np.mean([e["pixel_mse"] for e in held])
    assert mean["pixel_psnr_db"] == pytest.approx(10 * np.log10(255 ** 2 / pixel))
    assert [e["kind"] for e in report["prompts"]] == ["instance", "instance", "holdout", "holdout", "custom"]
    assert row == latents["base"].shape[0]


def _valid_png(path: Path) -> tuple[int, int]:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        image.load()
        assert image.width > 0 and image.height > 0
        return image.size


def test_plots_and_grid_are_valid_pngs(runs):
    run_dir, report, summary, *_ = runs["global"]
    assert sorted(report["files"]["plots"]) == ["drift", "null_dims", "preservation", "spectrum"]
    for rel in report["files"]["plots"].values():
        width, height = _valid_png(run_dir / rel)
        assert width > 300 and height > 200
    width, height = _valid_png(run_dir / report["files"]["grid"])
    rows = len(report["prompts"])
    # Labelled rows of 32 px samples upscaled to 128 px: one row per prompt, base and fine-tuned columns.
    assert height >= rows * 128 and width >= 2 * 128
    grid = np.asarray(Image.open(run_dir / report["files"]["grid"]).convert("RGB"))
    first = np.asarray(Image.open(run_dir / report["prompts"][0]["base"][0]).convert("RGB"))
    upscaled = first.repeat(4, axis=0).repeat(4, axis=1)
    found = any((grid[y:y + 128, x:x + 128] == upscaled).all() for y in range(30, 60) for x in range(240, 280))
    assert found, "the first base sample, upscaled 4x with NEAREST, is in the grid's first row"


def test_report_md_links_resolve(runs):
    for name in ("global", "bare"):
        run_dir, report, summary, *_ = runs[name]
        page = (run_dir / "report" / "report.md").read_text()
        links = re.findall(r"\]\(([^)]+)\)", page)
        assert "grid.png" in links and "report.json" in links
        assert set(report["files"]["plots"].values()) <= {f"report/{link}" for link in links}
        for link in links:
            assert (run_dir / "report" / link).exists(), link


def test_run_without_training_report_or_statistics(runs):
    run_dir, report, *_ = runs["bare"]
    check_report(report)
    assert report["preservation"] is None and report["null_space"] is None and report["baseline"] is None
    assert sorted(report["files"]["plots"]) == ["drift"]


def test_check_report_names_the_first_bad_field(runs):
    report = runs["global"][1]
    cases = [
        (lambda r: r.pop("drift"), "report: missing key(s) drift"),
        (lambda r: r["prompts"][1].update(latent_mse=-1.0),
         "report.prompts[1].latent_mse: expected a finite number ≥ 0, got float -1.0"),
        (lambda r: r["prompts"][0].update(kind="other"),
         "report.prompts[0].kind: expected one of 'instance', 'class', 'holdout', 'custom', got str 'other'"),
        (lambda r: r["null_space"]["layers"].update(x={"in_features": 4, "global": "2", "per_timestep": {},
                                                       "tau": None}),
         "report.null_space.layers.x.global: expected an integer, got str '2'"),
        (lambda r: r["files"].update(extra="x"), "report.files: unknown key(s) extra"),
    ]
    for mutate, message in cases:
        broken = copy.deepcopy(report)
        mutate(broken)
        with pytest.raises(NullBoothError) as err:
            check_report(broken)
        assert str(err.value) == message


def test_compare_runs_table_and_plot(runs, tmp_path, capsys):
    glob, none = runs["global"], runs["none"]
    assert cli_main(["compare", str(glob[0]), str(none[0]), "--out", str(tmp_path / "cmp")]) == 0
    out = compare_runs(str(glob[0]), str(none[0]), out_dir=str(tmp_path / "cmp"))
    rows = out["rows"]
    assert [r["mode"] for r in rows] == ["global", "none"]
    for row, (_, report, *_rest) in zip(rows, (glob, none)):
        held = [p for p in report["prompts"] if p["kind"] == "holdout"]
        assert row["holdout_prompts"] == 2
        assert row["drift_latent_mse"] == pytest.approx(np.mean([p["latent_mse"] for p in held]))
        assert row["preservation_overall"] == report["preservation"]["overall"]
        ns = report["null_space"]
        assert row["null_text"] == f"{ns['text']['dim']}/{ns['text']['in_features']}"
    table = list(csv.DictReader(io.StringIO((tmp_path / "cmp" / "compare.csv").read_text())))
    assert [float(r["drift_latent_mse"]) for r in table] == pytest.approx([r["drift_latent_mse"] for r in rows])
    assert [r["mode"] for r in table] == ["global", "none"]
    _valid_png(tmp_path / "cmp" / "compare.png")
    printed = capsys.readouterr().out
    assert "| A: global | global | 2 |" in printed and "| B: none | none | 2 |" in printed
    assert "compare.png" in (tmp_path / "cmp" / "compare.md").read_text()


def test_compare_needs_reports(runs, tmp_path):
    with pytest.raises(NullBoothError) as err:
        compare_runs(str(runs["global"][0]), str(tmp_path / "nothing"))
    assert str(err.value) == (f"{tmp_path / 'nothing'}/report/report.json does not exist: run `nullbooth generate` "
                              "on that run first")


def test_training_report_layouts(tmp_path):
    """Errors nested under "preservation" (the training stage), flat at the top, or null (mode none, no statistics)."""
    from nullbooth.report.write import read_preservation

    run = RunDir(str(tmp_path))
    assert read_preservation(run) is None
    flat = {"mode": "global", "overall": 0.1, "max": 0.2, "per_layer": {"a": 0.2, "b": float("nan")},
            "per_timestep": {"501": 0.05, "1": {"overall": 0.15}}, "unprotected": ["c"]}
    (tmp_path / "lora").mkdir()
    (tmp_path / "lora" / "report.json").write_text(json.dumps(flat))  # json writes NaN, which Python reads back
    assert read_preservation(run) == {"source": "lora/report.json", "mode": "global", "overall": 0.1, "max": 0.2,
                                      "per_layer": {"a": 0.2, "b": None}, "per_timestep": {"501": 0.05, "1": 0.15},
                                      "unprotected": ["c"]}
    (tmp_path / "lora" / "report.json").write_text(json.dumps({"mode": "none", "preservation": None}))
    assert read_preservation(run) == {"source": "lora/report.json", "mode": "none", "overall": None, "max": None,
                                      "per_layer": {}, "per_timestep": {}, "unprotected": []}


def test_instance_and_class_prompts_get_their_own_image_count():
    config = load_config(None, ["generate.subject_images=3", "generate.num_images_per_prompt=2"])
    base = config.generate.seed + 1000 * 4
    assert seeds_for(config, 4, "instance") == seeds_for(config, 4, "class") == [base, base + 1, base + 2]
    assert seeds_for(config, 4, "holdout") == seeds_for(config, 4, "custom") == [base, base + 1]
    unset = load_config(None, ["generate.num_images_per_prompt=2"])
    assert seeds_for(unset, 4, "instance") == [base, base + 1]


def test_compare_warns_once_when_the_base_models_differ(runs, tmp_path, capsys):
    """Same base model: no warning. Another UNet (fingerprint) or, without fingerprints, another model path: one
    line on stderr, and the same warning on the page."""
    glob, none = str(runs["global"][0]), runs["none"][0]
    assert compare_runs(glob, str(none), out_dir=str(tmp_path / "same"))["warnings"] == []
    assert "Warning" not in (tmp_path / "same" / "compare.md").read_text()

    other = tmp_path / "other-unet"
    shutil.copytree(none, other)
    manifest = json.loads((other / "covariance" / "manifest.json").read_text())
    manifest["model"]["fingerprint"] = "0123456789abcdef"
    (other / "covariance" / "manifest.json").write_text(json.dumps(manifest))
    assert cli_main(["compare", glob, str(other), "--out", str(tmp_path / "cmp")]) == 0
    expected = ("the two runs have different base models (A: global: sd 'tiny' (UNet fake); B: other-unet: sd 'tiny' "
                "(UNet 0123456789abcdef)); their drift and preservation figures are not comparable")
    assert capsys.readouterr().err == f"nullbooth: warning: {expected}\n"
    assert f"**Warning:** {expected}." in (tmp_path / "cmp" / "compare.md").read_text()

    no_stats = tmp_path / "no-stats"  # no fingerprint recorded: told apart by backend and model path
    shutil.copytree(runs["bare"][0], no_stats)
    report = json.loads((no_stats / "report" / "report.json").read_text())
    report["model"]["path"] = "/models/another"
    (no_stats / "report" / "report.json").write_text(json.dumps(report))
    assert compare_runs(glob, str(no_stats), out_dir=str(tmp_path / "cmp2"))["warnings"] == [
        "the two runs have different base models (A: global: sd 'tiny' (UNet fake); B: no-stats: sd '/models/another'); "
        "their drift and preservation figures are not comparable"]


def test_report_md_says_the_preservation_error_is_at_lora_scale_1_when_the_images_are_not(runs):
    """Training measures ΔW as trained; at generate.lora_scale s the update, and so the error, is s times that."""
    from nullbooth.report.markdown import render_markdown

    run_dir, report, *_ = runs["global"]
    assert report["lora_scale"] == 1.0
    page = (run_dir / "report" / "report.md").read_text()
    assert page == render_markdown(report) and "LoRA scale 1, as trained" not in page
    halved = copy.deepcopy(report)
    halved["lora_scale"] = 0.5
    overall = report["preservation"]["overall"]
    note = ("- measured at LoRA scale 1, as trained; these images were sampled at LoRA scale 0.5, which scales ΔW and "
            f"so every error here by 0.5 (overall {0.5 * overall:.4g} at scale 0.5)")
    lines = render_markdown(halved).splitlines()
    assert note in lines
    section = lines[lines.index("## Layer-level preservation error (training)"):]
    assert section.index(note) < section.index(next(s for s in section[1:] if s.startswith("## ")))


def test_report_names_the_adapter_and_reads_version_2_reports_as_lora(runs):
    """report.json records train.adapter (format 3); a format-2 report, made when LoRA was the only adapter, reads
    as "lora"; the page of a full fine-tune does not call it a LoRA."""
    from nullbooth.report.markdown import render_markdown
    from nullbooth.report.schema import FORMAT_VERSION, check_report

    _, report, *_ = runs["global"]
    assert report["format_version"] == FORMAT_VERSION == 3 and report["adapter"] == "lora"
    old = copy.deepcopy(report)
    old["format_version"] = 2
    del old["adapter"]
    check_report(old)
    assert old["adapter"] == "lora" and old["format_version"] == 3
    bad = copy.deepcopy(report)
    bad["adapter"] = "dora"
    with pytest.raises(NullBoothError, match="report.adapter"):
        check_report(bad)
    full = copy.deepcopy(report)
    full["adapter"] = "full"
    page = render_markdown(full)
    assert "full fine-tune, update scale 1" in page and "LoRA scale" not in page
    assert "LoRA, LoRA scale 1" in render_markdown(report)


def test_grid_rows_with_fewer_images_start_under_their_groups_label():
    """An instance prompt with 3 images per model above a held-out prompt with 1: the held-out prompt's fine-tuned
    image sits where the instance prompt's fine-tuned images start, not next to its base image."""
    from nullbooth.report.plots import image_grid

    def solid(rgb):
        return np.full((8, 8, 3), rgb, dtype=np.uint8)

    red, green, blue, yellow = (220, 0, 0), (0, 200, 0), (0, 0, 230), (240, 230, 0)
    rows = [PromptSamples("subject", "instance", base=[solid(red)] * 3, finetuned=[solid(green)] * 3),
            PromptSamples("held out", "holdout", base=[solid(blue)], finetuned=[solid(yellow)])]
    grid = np.asarray(Image.open(io.BytesIO(image_grid(rows))).convert("RGB"))

    def first_column(colour):  # the leftmost x of a pixel of exactly that colour
        return int(np.argwhere((grid == colour).all(axis=-1))[:, 1].min())

    assert first_column(yellow) == first_column(green)
    assert first_column(blue) == first_column(red) < first_column(green)
