"""Config loading: every shipped YAML validates; each kind of mistake gets a message naming the key."""

import dataclasses
from pathlib import Path

import pytest
import yaml

from nullbooth.cli import main as cli_main
from nullbooth.config import Config, apply_override, load_config, reference_table
from nullbooth.errors import NullBoothError

ROOT = Path(__file__).resolve().parent.parent
NULLBOOTH_CONFIGS = sorted(p for p in (ROOT / "configs").glob("*.yaml") if not p.name.startswith("cluster"))


def test_configs_folder_ships_the_configs():
    assert {p.name for p in NULLBOOTH_CONFIGS} >= {"toy.yaml", "toy-lcm.yaml", "tiny.yaml", "tiny-lcm.yaml",
                                                   "sd15.yaml", "lcm.yaml"}


@pytest.mark.parametrize("path", NULLBOOTH_CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_validates_and_keeps_its_values(path):
    raw = yaml.safe_load(path.read_text())
    config = load_config(path)
    # Every value written in the YAML arrives unchanged in the typed config (nothing silently dropped).
    def walk(node, obj, where):
        for key, value in node.items():
            got = getattr(obj, key)
            if isinstance(value, dict):
                walk(value, got, f"{where}{key}.")
            else:
                assert got == value, f"{where}{key}"
    walk(raw, config, "")


def test_defaults_are_a_valid_config():
    config = load_config(None)
    assert config == Config()


def test_override_parses_values_as_yaml_and_reaches_nested_sections():
    config = load_config(None, ["sampling.num_inference_steps=12", "projection.threshold.value=1e-2",
                                "covariance.layers=[attn2.to_k]", "train.use_gpu=true",
                                "sampling.negative_prompt=blurry, low quality"])
    assert config.sampling.num_inference_steps == 12
    assert config.projection.threshold.value == pytest.approx(0.01)
    assert config.covariance.layers == ["attn2.to_k"]
    assert config.train.use_gpu is True
    assert config.sampling.negative_prompt == "blurry, low quality"


def test_override_on_top_of_a_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("sampling: {num_inference_steps: 3}\nrun_dir: a\n")
    config = load_config(path, ["run_dir=b"])
    assert (config.sampling.num_inference_steps, config.run_dir) == (3, "b")


@pytest.mark.parametrize("override, message", [
    ("sampling.num_inferense_steps=3",
     "unknown config key sampling.num_inferense_steps; did you mean sampling.num_inference_steps?"),
    ("sampling.num_inference_steps=many", "sampling.num_inference_steps: expected an integer, got str 'many'"),
    ("sampling.num_inference_steps=2.5", "sampling.num_inference_steps: expected an integer, got float 2.5"),
    ("train.use_gpu=yes please", "train.use_gpu: expected a boolean (true/false), got str 'yes please'"),
    ("covariance.layers=attn2.to_k", "covariance.layers: expected a list, got str 'attn2.to_k'"),
    ("projection.mode=globl", "projection.mode: expected one of global, timestep, none; got 'globl' "
                              "(did you mean 'global'?)"),
    ("sampling.scheduler=dpm", "sampling.scheduler: expected one of ddim, dpm++2m, dpm++2m-karras, euler, euler-a, "
                               "unipc, lcm; got 'dpm' (did you mean 'dpm++2m'?)"),
    ("covariance.num_workers=0", "covariance.num_workers: expected a value ≥ 1, got 0"),
    ("train.alpha=0", "train.alpha: expected a value > 0.0, got 0.0"),
    ("train.dropout=1.5", "train.dropout: expected a value ≤ 1.0, got 1.5"),
    ("model.backend=lcm", "sampling.scheduler: model.backend 'lcm' samples with 'lcm', got 'ddim'"),
    ("sampling.scheduler=lcm", "sampling.scheduler: 'lcm' needs model.backend: lcm (a Latent Consistency Model)"),
    ("sampling.height=30", "sampling.height: must be a multiple of 8, got 30"),
    ("preserve.prompts_file=/no/such/prompts.txt", "preserve.prompts_file: file '/no/such/prompts.txt' does not exist"),
    ("preserve.prompts_file=s3://bucket/prompts.txt", "preserve.prompts_file: 's3://bucket/prompts.txt' is a URI; give "
                                                      "a local file (or 'demo')"),
    ("sampling=4", "sampling: expected a mapping of keys, got int 4"),
    ("nonsense", "--set 'nonsense': expected KEY=VALUE, e.g. --set sampling.num_inference_steps=8"),
    ("train.with_prior_preservation=true", "train.class_prompt: required when train.with_prior_preservation is true"),
    ("train.learning_rate=.nan", "train.learning_rate: expected a finite number, got nan"),
    ("generate.lora_scale=.inf", "generate.lora_scale: expected a finite number, got inf"),
    ("projection.threshold.value=1.0", "projection.threshold.value: for kind 'relative' expected a value ≥ 0 and < 1, "
                                       "got 1.0"),
    ("projection.threshold.value=.nan", "projection.threshold.value: expected a finite number, got nan"),
    ("sampling.width=8192", "sampling.width: expected a value ≤ 4096, got 8192"),
    ("train.train_batch_size=100000", "train.train_batch_size: expected a value ≤ 4096, got 100000"),
])
def test_mistakes_name_the_key_and_the_expected_form(override, message):
    with pytest.raises(NullBoothError) as err:
        load_config(None, [override])
    assert str(err.value) == message


def test_unknown_top_level_key_lists_the_sections(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("modle: {path: tiny}\n")
    with pytest.raises(NullBoothError, match=r"unknown config key modle; did you mean model\?"):
        load_config(path)


def test_bad_files(tmp_path):
    with pytest.raises(NullBoothError, match="config file '.*missing.yaml' does not exist"):
        load_config(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [unclosed\n")
    with pytest.raises(NullBoothError) as err:
        load_config(broken)
    assert str(err.value) == (f"config file {str(broken)!r} is not valid YAML: expected ',' or ']', but got "
                              "'<stream end>' at line 2, column 1")
    latin = tmp_path / "latin1.yaml"
    latin.write_bytes("run_dir: caf\xe9\n".encode("latin-1"))
    with pytest.raises(NullBoothError) as err:
        load_config(latin)
    assert str(err.value) == f"config file {str(latin)!r} is not UTF-8 text (byte 12)"
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(NullBoothError, match="must hold a mapping of sections, got list"):
        load_config(listy)


def test_output_folders_that_cannot_be_written_are_refused_from_the_config(tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    cases = {f"run_dir={a_file}": f"run_dir: {str(a_file)!r} exists and is not a folder",
             f"run_dir={a_file}/run": f"run_dir: {str(a_file / 'run')!r} cannot be written: {str(a_file)!r} is not a "
                                      "writable folder",
             "run_dir=/proc/nullbooth-run": "run_dir: '/proc/nullbooth-run' cannot be written: '/proc' is not a "
                                            "writable folder",
             "train.storage_path=/sys/ckpt": "train.storage_path: '/sys/ckpt' cannot be written: '/sys' is not a "
                                             "writable folder"}
    for override, message in cases.items():
        with pytest.raises(NullBoothError) as err:
            load_config(None, [override])
        assert str(err.value) == message
    assert load_config(None, [f"run_dir={tmp_path / 'new' / 'run'}"]).run_dir == str(tmp_path / "new" / "run")
    assert not (tmp_path / "new").exists()  # checking creates nothing


def test_a_bad_model_path_is_refused_from_the_config(tmp_path, capsys):
    """A typo in model.path is refused when the config is read, not by the actors after Ray started (issue 10)."""
    import ray

    from nullbooth.config import EMBEDDED_MODEL_NAMES
    from nullbooth.models.registry import EMBEDDED_MODELS

    (tmp_path / "empty").mkdir()
    cases = {"/no/such/model": "model.path: '/no/such/model' is neither a local folder, a hub id (org/name) nor one "
                               "of 'tiny', 'tiny-lcm', 'toy', 'toy-lcm'",
             "tiny-lcn": "model.path: 'tiny-lcn' is neither a local folder, a hub id (org/name) nor one of 'tiny', "
                         "'tiny-lcm', 'toy', 'toy-lcm'",
             str(tmp_path / "empty"): f"model.path: {str(tmp_path / 'empty')!r} is not a diffusers pipeline folder "
                                      "(no model_index.json)"}
    for path, message in cases.items():
        with pytest.raises(NullBoothError) as err:
            load_config(None, [f"model.path={path}"])
        assert str(err.value) == message
    for path in [*EMBEDDED_MODEL_NAMES, "org/name"]:  # a hub id is the actors' to download
        assert load_config(None, [f"model.path={path}"]).model.path == path
    assert EMBEDDED_MODEL_NAMES == tuple(EMBEDDED_MODELS)
    # Through the CLI: one line, exit 2, and no Ray was started for it.
    was_up = ray.is_initialized()
    assert cli_main(["build-cov", str(ROOT / "configs" / "tiny.yaml"), "--set", "model.path=/no/such/model",
                     "--set", f"run_dir={tmp_path / 'run'}"]) == 2
    assert capsys.readouterr().err == f"nullbooth: error: {cases['/no/such/model']}\n"
    assert ray.is_initialized() == was_up
    assert not (tmp_path / "run").exists()


def test_a_plain_baseline_needs_a_projected_run_and_no_second_baseline():
    with pytest.raises(NullBoothError) as err:
        load_config(None, ["train.plain_baseline=true", "projection.mode=none"])
    assert str(err.value) == ("train.plain_baseline: the run itself trains a plain LoRA (projection.mode: none); "
                              "the baseline is for global or timestep mode")
    with pytest.raises(NullBoothError, match="generate.baseline_run: train.plain_baseline already gives"):
        load_config(None, ["train.plain_baseline=true", "generate.baseline_run=/tmp/other"])


@pytest.mark.parametrize("kind, good, bad", [("relative", 0.999, 1.0), ("energy", 0.5, 1.0),
                                             ("percentile", 99.0, 100.0), ("absolute", 1e9, -1e-9)])
def test_threshold_values_in_and_out_of_range_for_their_kind(kind, good, bad):
    assert load_config(None, [f"projection.threshold.kind={kind}", f"projection.threshold.value={good}"])
    with pytest.raises(NullBoothError, match=f"projection.threshold.value: .*got {bad!r}"):
        load_config(None, [f"projection.threshold.kind={kind}", f"projection.threshold.value={bad}"])


def test_override_into_a_value_that_is_not_a_section():
    raw = {"run_dir": "x"}
    with pytest.raises(NullBoothError, match="'run_dir' is not a section"):
        apply_override(raw, "run_dir.sub=1")


def test_reference_table_lists_every_leaf_key():
    table = reference_table()
    def leaves(cls, prefix=""):
        for f in dataclasses.fields(cls):
            default = getattr(cls(), f.name)
            if dataclasses.is_dataclass(default):
                yield from leaves(type(default), f"{prefix}{f.name}.")
            else:
                yield f"{prefix}{f.name}"
    keys = list(leaves(Config))
    assert len(keys) > 50
    for key in keys:
        assert f"| `{key}` |" in table


def test_cli_validate_prints_the_resolved_config_or_one_error_line(capsys):
    assert cli_main(["validate", str(ROOT / "configs" / "tiny.yaml"), "--set", "sampling.num_inference_steps=9"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["sampling"]["num_inference_steps"] == 9
    assert printed["model"]["path"] == "tiny"

    assert cli_main(["validate", str(ROOT / "configs" / "tiny.yaml"), "--set", "sampling.stepz=9"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == ("nullbooth: error: unknown config key sampling.stepz; known keys: scheduler, "
                            "num_inference_steps, guidance_scale, negative_prompt, height, width, "
                            "original_inference_steps, seed\n")
