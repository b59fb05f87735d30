"""Stage 1's user errors: each names the problem and leaves no partial run behind. All of them are caught in the
driver before Ray is even needed (the empty-null-space error, which comes at the end, is in test_stats_build)."""

import shutil
from pathlib import Path

import pytest
import ray

from nullbooth.cli import guarded
from nullbooth.config import load_config
from nullbooth.errors import NullBoothError
from nullbooth.stats.build import build_covariance

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["preserve.max_prompts=6", "preserve.holdout=2", "covariance.batch_size=2", "sampling.num_inference_steps=1",
         "covariance.num_workers=1", "covariance.eigh_group_size=64", "covariance.dtype=float64"]


def make_config(run_dir, *extra):
    return load_config(ROOT / "configs" / "tiny.yaml", [f"run_dir={run_dir}", *SMALL, *extra])


def assert_nothing_written(run_dir: Path) -> None:
    leftovers = sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.is_file()) \
        if run_dir.exists() else []
    assert leftovers == []


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_ray_address_is_one_line_and_exit_2(tmp_path, capsys):
    # First in the module, before the module's local Ray: connect() only probes when Ray is not up yet.
    if ray.is_initialized():
        ray.shutdown()
    address = f"127.0.0.1:{free_port()}"
    config = make_config(tmp_path / "run", f"ray.address={address}")
    assert guarded(lambda: build_covariance(config)) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines()[-1].startswith(f"nullbooth: error: ray.address: cannot reach the Ray cluster at "
                                           f"'{address}'")
    assert "Traceback" not in err
    assert not ray.is_initialized()
    assert_nothing_written(tmp_path / "run")


def test_an_address_from_the_environment_is_labelled_RAY_ADDRESS(monkeypatch):
    """An error about RAY_ADDRESS names RAY_ADDRESS, not the config key ray.address the user never set."""
    import socket

    import nullbooth.cluster as cluster
    from nullbooth.config import RayConfig

    if ray.is_initialized():
        ray.shutdown()

    def refuse(*args, **kwargs):
        raise ConnectionError("the GCS did not answer\nsecond line of Ray's text")

    monkeypatch.setattr(cluster.ray, "init", refuse)
    with socket.socket() as listener:  # something listens, so the quick probe passes and ray.init is reached
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        address = f"127.0.0.1:{listener.getsockname()[1]}"
        monkeypatch.setenv("RAY_ADDRESS", address)
        for ray_config, key in ((RayConfig(), "RAY_ADDRESS"), (RayConfig(address=address), "ray.address")):
            with pytest.raises(NullBoothError) as err:
                cluster.connect(ray_config)
            assert str(err.value) == f"{key}: cannot reach the Ray cluster at {address!r}: the GCS did not answer"
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{free_port()}")  # nobody listens: the probe's error
    with pytest.raises(NullBoothError, match="^RAY_ADDRESS: cannot reach the Ray cluster at '127.0.0.1:"):
        cluster.connect(RayConfig())


def test_missing_prompt_file(tmp_path):
    config = make_config(tmp_path / "run")
    config.preserve.prompts_file = str(tmp_path / "gone.txt")  # removed after the config was validated
    with pytest.raises(NullBoothError, match=r"prompts file '.*gone\.txt': no such file"):
        build_covariance(config)
    assert_nothing_written(tmp_path / "run")


def test_empty_prompt_file(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# only a comment\n\n   \n")
    config = make_config(tmp_path / "run", f"preserve.prompts_file={prompts}")
    with pytest.raises(NullBoothError, match=r"prompts file .*prompts\.txt: contains no prompts"):
        build_covariance(config)
    assert_nothing_written(tmp_path / "run")


def test_holdout_that_leaves_no_prompt(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red car\na blue house\n")
    config = make_config(tmp_path / "run", f"preserve.prompts_file={prompts}", "preserve.holdout=2")
    with pytest.raises(NullBoothError, match="preserve.holdout: holding out 2 of the 2 prompts .* leaves none"):
        build_covariance(config)
    assert_nothing_written(tmp_path / "run")


def test_layer_filter_that_matches_nothing(tmp_path):
    config = make_config(tmp_path / "run", "covariance.layers=[attn2.to_q, attn2.to_qq]")
    with pytest.raises(NullBoothError, match="covariance.layers: pattern 'attn2.to_qq' matches no linear layer"):
        build_covariance(config)
    assert_nothing_written(tmp_path / "run")


def test_model_without_cross_attention(tmp_path):
    from diffusers import UNet2DConditionModel

    from nullbooth.models.tiny import ensure_tiny_model

    model = tmp_path / "no-attn2"
    shutil.copytree(ensure_tiny_model("tiny"), model)
    shutil.rmtree(model / "unet")
    UNet2DConditionModel(sample_size=16, block_out_channels=(32, 64), layers_per_block=1,
                         down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                         mid_block_type="UNetMidBlock2D", cross_attention_dim=64,
                         norm_num_groups=32).save_pretrained(model / "unet")
    config = make_config(tmp_path / "run", f"model.path={model}")
    with pytest.raises(NullBoothError, match=r"has no cross-attention \(attn2\) layers"):
        build_covariance(config)
    assert_nothing_written(tmp_path / "run")


def test_a_model_folder_with_an_unreadable_unet_is_refused_before_ray_starts(tmp_path, monkeypatch):
    """model_index.json but no readable unet/config.json: a clean line from the driver, not from every actor after
    Ray started (the check used to swallow the error and leave it to the actors)."""
    import nullbooth.stats.build as build
    from nullbooth.models.tiny import ensure_tiny_model

    model = tmp_path / "broken-model"
    shutil.copytree(ensure_tiny_model("tiny"), model)
    (model / "unet" / "config.json").write_text("{not json")
    config = make_config(tmp_path / "run", f"model.path={model}")

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started before the model was checked")

    monkeypatch.setattr(build, "connect", no_ray)
    with pytest.raises(NullBoothError) as err:
        build_covariance(config)
    assert str(err.value).startswith(f"model.path: cannot read the UNet of {str(model)!r}: ")
    assert "\n" not in str(err.value)
    assert_nothing_written(tmp_path / "run")
