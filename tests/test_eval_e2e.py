"""`nullbooth eval` end to end at reduced scale, through the Ray Data sampler and a Ray extraction task.

On the toy-world model (probe features) the run's LoRA is a zeroed one and its plain-LoRA baseline a strongly
perturbed one: the fine-tuned set must then be bit-identical to the base model's reference set (same seeds), every
metric of it equal to the reference's, while the perturbed LoRA moves away; and the numbers in eval.json are
recomputed here from the saved features with independent code. On the tiny model the CLIP and DINO extractors (small
random models built offline) run the same path, CLIP-T included.
"""

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from run_fixtures import make_lora
from safetensors import safe_open
from test_eval_extractors import build_clip, build_dinov2

from nullbooth.cli import main
from nullbooth.config import load_config
from nullbooth.prompts import preserved_prompts
from nullbooth.report.compare import compare_runs
from nullbooth.report.evaluate import evaluate
from nullbooth.report.generate import generate

ROOT = Path(__file__).resolve().parent.parent
N = 6
METRICS = {"fd", "mmd2", "precision", "recall", "density", "coverage", "one_nn_accuracy"}


def read_features(run_dir: Path) -> tuple[dict[str, np.ndarray], dict]:
    with safe_open(str(run_dir / "report" / "eval_features.safetensors"), "np") as f:
        return {k: f.get_tensor(k).astype(np.float64) for k in f.keys()}, json.loads(f.metadata()["rows"])


@pytest.fixture(scope="module")
def toy_eval(ray_local, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("eval") / "run"
    make_lora("toy", run_dir / "lora", b_std=0.0)
    make_lora("toy", run_dir / "lora-none", b_std=0.5, seed=1)
    config = load_config(ROOT / "configs" / "toy.yaml", [
        f"run_dir={run_dir}", "eval.prompts=2", f"eval.images_per_prompt={N}", "eval.subject_images=2", "eval.k=2",
        "eval.num_workers=1", "generate.num_workers=1"])
    held = preserved_prompts(config)[1][:2]
    generate(load_config(ROOT / "configs" / "toy.yaml", [f"run_dir={run_dir}", "generate.num_workers=1",
                                                         f"generate.prompts={json.dumps(held[:1])}"]))
    summary = evaluate(config)
    return run_dir, held, summary


def test_eval_json_has_every_metric_for_every_set(toy_eval):
    run_dir, held, summary = toy_eval
    ev = json.loads((run_dir / "report" / "eval.json").read_text())
    assert ev == summary["evaluation"]
    assert ev["held_out_prompts"] == held and len(ev["instance_prompts"]) == 5  # the toy's instance variants
    drift = ev["drift"]["probe"]
    assert drift["dim"] == 96 and set(ev["drift"]) == set(ev["fidelity"]) == {"probe"}
    for section in ("pooled", "mean_over_prompts"):
        assert set(drift[section]) == {"reference", "finetuned", "plain"}
        assert all(set(row) == METRICS for row in drift[section].values())
    assert [p["prompt"] for p in drift["per_prompt"]] == held
    fidelity = ev["fidelity"]["probe"]
    assert fidelity["image_score"] == "probe-I" and fidelity["text_score"] is None
    assert all(fidelity[m]["text"] is None and -1 <= fidelity[m]["image"] <= 1 for m in ("base", "finetuned", "plain"))
    features, rows = read_features(run_dir)
    assert features["probe/base"].shape == features["probe/plain"].shape == (2 * N, 96)
    assert features["probe/subject_base"].shape == (10, 96) and features["probe/instance"].shape[0] == ev["instance_images"]
    assert [r["seed"] for r in rows["base"]] == [5678 + i for i in range(N)] + [6678 + i for i in range(N)]
    assert [r["seed"] for r in rows["compared"]] == [5678 + i for i in range(N, 2 * N)] + [6678 + i for i in range(N, 2 * N)]


def test_a_zero_lora_reads_exactly_as_no_change_and_a_perturbed_one_moves(toy_eval):
    run_dir, _, _ = toy_eval
    ev = json.loads((run_dir / "report" / "eval.json").read_text())
    features, _ = read_features(run_dir)
    np.testing.assert_array_equal(features["probe/finetuned"], features["probe/reference"])
    np.testing.assert_array_equal(features["probe/subject_finetuned"], features["probe/subject_base"])
    drift = ev["drift"]["probe"]
    assert drift["pooled"]["finetuned"] == drift["pooled"]["reference"]
    assert ev["fidelity"]["probe"]["finetuned"] == ev["fidelity"]["probe"]["base"]
    assert not np.array_equal(features["probe/base"], features["probe/reference"])  # other seeds, other images
    assert drift["pooled"]["plain"]["fd"] > 2 * drift["pooled"]["reference"]["fd"]
    assert drift["pooled"]["plain"]["one_nn_accuracy"] > drift["pooled"]["reference"]["one_nn_accuracy"]


def test_the_numbers_are_those_of_the_saved_features(toy_eval):
    """Recomputed here by loops and another matrix route, not by nullbooth.report.distances."""
    run_dir, _, _ = toy_eval
    ev = json.loads((run_dir / "report" / "eval.json").read_text())
    features, _ = read_features(run_dir)
    x, k = features["probe/base"], ev["settings"]["k"]
    for model in ("reference", "plain"):
        y = features[f"probe/{model}"]
        got = ev["drift"]["probe"]["pooled"][model]
        s1, s2 = np.cov(x.T), np.cov(y.T)
        trace_sqrt = np.sqrt(np.linalg.eigvals(s1 @ s2).real.clip(0)).sum()  # eigenvalues of a PSD product
        fd = ((x.mean(0) - y.mean(0)) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * trace_sqrt
        assert got["fd"] == pytest.approx(fd, rel=1e-4, abs=1e-6)
        d = x.shape[1]

        def kern(a, b):
            return (float(a @ b) / d + 1) ** 3

        m = len(x)
        mmd = (sum(kern(x[i], x[j]) for i, j in itertools.permutations(range(m), 2)) / (m * (m - 1))
               + sum(kern(y[i], y[j]) for i, j in itertools.permutations(range(m), 2)) / (m * (m - 1))
               - 2 * sum(kern(a, b) for a in x for b in y) / (m * m))
        assert got["mmd2"] == pytest.approx(mmd, rel=1e-6, abs=1e-6 * abs(kern(x[0], x[0])))
        both = [(row, 0) for row in x] + [(row, 1) for row in y]
        hits = 0
        for i, (row, label) in enumerate(both):
            others = [(np.linalg.norm(row - o), lab) for j, (o, lab) in enumerate(both) if j != i]
            hits += min(others, key=lambda t: t[0])[1] == label
        assert got["one_nn_accuracy"] == pytest.approx(hits / len(both))
        radius = [sorted(np.linalg.norm(a - b) for j, b in enumerate(x) if j != i)[k - 1] for i, a in enumerate(x)]
        covered = [any(np.linalg.norm(a - b) <= radius[i] for b in y) for i, a in enumerate(x)]
        assert got["coverage"] == pytest.approx(np.mean(covered))
    inst, sub = features["probe/instance"], features["probe/subject_plain"]
    cos = [a @ b / np.linalg.norm(a) / np.linalg.norm(b) for a in sub for b in inst]
    assert ev["fidelity"]["probe"]["plain"]["image"] == pytest.approx(np.mean(cos), rel=1e-6)


def test_report_page_compare_and_the_cli(toy_eval, tmp_path, capsys):
    run_dir, _, summary = toy_eval
    page = (run_dir / "report" / "report.md").read_text()
    assert "## Feature-space evaluation (`nullbooth eval`)" in page and "| probe-I |" in page
    assert "![feature-space drift per prompt](plots/eval.png)" in page and (run_dir / "report/plots/eval.png").is_file()
    assert summary["report_md"] == str(run_dir / "report" / "report.md")
    table = compare_runs(str(run_dir), str(run_dir), out_dir=str(tmp_path))["table"]
    header, _, row, _ = table.split("\n", 3)
    assert "| 1-NNA | subject fidelity |" in header and "| probe |" in row
    fd = json.loads((run_dir / "report" / "eval.json").read_text())["drift"]["probe"]["pooled"]["finetuned"]["fd"]
    assert f"| {fd:.4g} |" in row
    assert main(["eval", str(ROOT / "configs" / "toy.yaml"), "--set", f"run_dir={tmp_path / 'empty'}"]) == 2
    assert "has no trained LoRA" in capsys.readouterr().err


def test_clip_and_dino_extractors_on_the_tiny_model(ray_local, tmp_path):
    run_dir = tmp_path / "run"
    make_lora("tiny", run_dir / "lora", b_std=0.3)
    clip, dino = build_clip(tmp_path / "clip"), build_dinov2(tmp_path / "dino")
    config = load_config(None, [f"run_dir={run_dir}", "sampling.num_inference_steps=2", "eval.extractors=[clip, dino]",
                                f"eval.clip_model={clip}", f"eval.dino_model={dino}", "eval.prompts=1",
                                "eval.images_per_prompt=4", "eval.k=2", "eval.subject_images=2"])
    ev = evaluate(config)["evaluation"]
    assert list(ev["drift"]) == ["clip", "dino"] and ev["drift"]["clip"]["dim"] == 16
    assert ev["fidelity"]["dino"]["image_score"] == "DINO" and ev["fidelity"]["dino"]["base"]["text"] is None
    features, rows = read_features(run_dir)
    text, samples = features["clip/text"], features["clip/subject_finetuned"]
    assert rows["text"] == ev["instance_prompts"] and text.shape == (len(ev["instance_prompts"]), 16)
    prompt_of = [ev["instance_prompts"].index(r["prompt"]) for r in rows["subject"]]
    clip_t = np.mean([s @ text[j] / np.linalg.norm(s) / np.linalg.norm(text[j]) for s, j in zip(samples, prompt_of)])
    assert ev["fidelity"]["clip"]["text_score"] == "CLIP-T"
    assert ev["fidelity"]["clip"]["finetuned"]["text"] == pytest.approx(clip_t, rel=1e-6)
    assert ev["drift"]["dino"]["pooled"]["finetuned"]["fd"] > 0


def test_statistics_of_another_config_are_refused_before_sampling(tmp_path):
    """The same checks as generate: statistics whose manifest disagrees with the config are refused, naming it."""
    from run_fixtures import write_fake_statistics

    from nullbooth.errors import NullBoothError

    run_dir = tmp_path / "run"
    write_fake_statistics(run_dir)
    make_lora("tiny", run_dir / "lora", b_std=0.0)
    with pytest.raises(NullBoothError, match=r"manifest.json: the statistics were made with another model or config"):
        evaluate(load_config(None, [f"run_dir={run_dir}", "sampling.num_inference_steps=7"]))
