"""Backends: timestep plans equal diffusers' own, LCM passes timestep_cond, a misfit model gets a clear error."""

import json
import shutil

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LatentConsistencyModelPipeline,
    LCMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
    UniPCMultistepScheduler,
)

from nullbooth.cli import main as cli_main
from nullbooth.config import load_config
from nullbooth.errors import NullBoothError
from nullbooth.models.backends import get_backend
from nullbooth.models.tiny import ensure_tiny_model

# Built by hand from diffusers, independently of nullbooth.models.backends.SCHEDULER_CLASSES.
EXPECTED = {
    "ddim": lambda path: DDIMScheduler.from_pretrained(path, subfolder="scheduler"),
    "dpm++2m": lambda path: DPMSolverMultistepScheduler.from_pretrained(path, subfolder="scheduler",
                                                                       algorithm_type="dpmsolver++"),
    "dpm++2m-karras": lambda path: DPMSolverMultistepScheduler.from_pretrained(
        path, subfolder="scheduler", algorithm_type="dpmsolver++", use_karras_sigmas=True),
    "euler": lambda path: EulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler"),
    "euler-a": lambda path: EulerAncestralDiscreteScheduler.from_pretrained(path, subfolder="scheduler"),
    "unipc": lambda path: UniPCMultistepScheduler.from_pretrained(path, subfolder="scheduler"),
}


@pytest.mark.parametrize("steps", [1, 4, 25])
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_sd_timestep_plan_is_exactly_diffusers(name, steps, capsys):
    path = str(ensure_tiny_model("tiny"))
    reference = EXPECTED[name](path)
    reference.set_timesteps(steps)
    expected = [int(t) for t in reference.timesteps]
    assert all(float(t) == int(t) for t in reference.timesteps)  # SD's "leading" spacing is integral

    config = load_config(None, [f"sampling.scheduler={name}", f"sampling.num_inference_steps={steps}"])
    assert get_backend(config).timestep_plan() == expected
    assert cli_main(["timesteps", "configs/tiny.yaml", "--set", f"sampling.scheduler={name}",
                     "--set", f"sampling.num_inference_steps={steps}"]) == 0
    assert json.loads(capsys.readouterr().out) == expected


def test_timesteps_and_validate_say_when_the_plan_repeats_timesteps(capsys):
    path = str(ensure_tiny_model("tiny"))
    reference = EXPECTED["dpm++2m-karras"](path)
    reference.set_timesteps(50)
    expected = [int(t) for t in reference.timesteps]
    assert expected[-3:] == [1, 1, 0]  # Karras sigmas near 0 round to one timestep: the UNet is called twice at t=1
    note = ("the plan repeats timesteps (1 ×2: 50 UNet calls at 49 distinct timesteps); the statistics keep one "
            "covariance per distinct timestep, holding every call at it, and the global covariance weights each "
            "timestep by its number of calls")
    karras = ["--set", "sampling.scheduler=dpm++2m-karras", "--set", "sampling.num_inference_steps=50"]
    assert cli_main(["timesteps", "configs/tiny.yaml", *karras]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out) == expected and err == f"nullbooth: note: {note}\n"
    assert cli_main(["validate", "configs/tiny.yaml", *karras]) == 0
    out, err = capsys.readouterr()
    assert out.endswith(f"# timestep plan (dpm++2m-karras, 50 steps): {expected}\n# note: {note}\n") and err == ""
    assert cli_main(["timesteps", "configs/tiny.yaml"]) == 0  # DDIM at 4 steps: no repeat, nothing said
    assert capsys.readouterr().err == ""
    assert cli_main(["validate", "configs/tiny.yaml"]) == 0
    assert "# note:" not in capsys.readouterr().out


@pytest.mark.parametrize("steps, original", [(4, None), (2, 50), (8, 20)])
def test_lcm_timestep_plan_uses_original_inference_steps(steps, original):
    path = str(ensure_tiny_model("tiny-lcm"))
    reference = LCMScheduler.from_pretrained(path, subfolder="scheduler")
    reference.set_timesteps(steps, original_inference_steps=original)
    overrides = [f"sampling.num_inference_steps={steps}"]
    if original:
        overrides.append(f"sampling.original_inference_steps={original}")
    config = load_config("configs/tiny-lcm.yaml", overrides)
    assert get_backend(config).timestep_plan() == [int(t) for t in reference.timesteps]


class UNetCalls:
    """Records the keyword arguments of every UNet call of a pipeline."""

    def __init__(self, unet):
        self.calls = []
        self.handle = unet.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        self.calls.append({"timestep": args[1] if len(args) > 1 else kwargs["timestep"],
                           "batch": args[0].shape[0], "timestep_cond": kwargs.get("timestep_cond")})


def test_lcm_backend_passes_the_guidance_embedding():
    config = load_config("configs/tiny-lcm.yaml", ["sampling.num_inference_steps=3", "sampling.guidance_scale=6"])
    backend = get_backend(config)
    pipe = backend.load_pipeline()
    assert isinstance(pipe, LatentConsistencyModelPipeline) and isinstance(pipe.scheduler, LCMScheduler)
    assert backend.uses_guidance is False
    cond, uncond = backend.encode(pipe, ["a red car", "a blue boat"])
    assert uncond is None and cond.shape == (2, 32, 64)
    recorder = UNetCalls(pipe.unet)
    backend.sample(pipe, cond, None, [torch.Generator().manual_seed(i) for i in range(2)])
    expected = pipe.get_guidance_scale_embedding(torch.full((2,), 5.0), embedding_dim=256)
    assert [int(c["timestep"]) for c in recorder.calls] == backend.timestep_plan()
    for call in recorder.calls:
        assert call["batch"] == 2  # no unconditional branch
        torch.testing.assert_close(call["timestep_cond"], expected)
    # The training-side UNet call adds the same embedding.
    torch.testing.assert_close(backend.timestep_cond(pipe.unet, 2), expected)


def test_sd_backend_samples_both_guidance_branches_over_the_plan():
    config = load_config("configs/tiny.yaml", ["sampling.num_inference_steps=3",
                                               "sampling.negative_prompt=blurry"])
    backend = get_backend(config)
    pipe = backend.load_pipeline()
    assert isinstance(pipe, StableDiffusionPipeline) and isinstance(pipe.scheduler, DDIMScheduler)
    cond, uncond = backend.encode(pipe, ["a red car"])
    # The negative branch is the pipeline's own encoding of the negative prompt.
    tokens = pipe.tokenizer(["blurry"], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                            truncation=True, return_tensors="pt").input_ids
    torch.testing.assert_close(uncond, pipe.text_encoder(tokens)[0])
    recorder = UNetCalls(pipe.unet)
    latents = backend.sample(pipe, cond, uncond, [torch.Generator().manual_seed(0)])
    assert [int(c["timestep"]) for c in recorder.calls] == backend.timestep_plan()
    assert all(c["batch"] == 2 and c["timestep_cond"] is None for c in recorder.calls)
    # Same seed, stock pipeline call with text prompts: the same trajectory.
    stock = pipe(prompt=["a red car"], negative_prompt=["blurry"], num_inference_steps=3, guidance_scale=7.5,
                 generator=[torch.Generator().manual_seed(0)], output_type="latent").images
    torch.testing.assert_close(latents, stock)


def test_lcm_backend_on_a_unet_without_time_cond_proj_dim_is_a_project_error():
    sd_path = str(ensure_tiny_model("tiny"))
    config = load_config("configs/tiny-lcm.yaml", [f"model.path={sd_path}"])
    with pytest.raises(NullBoothError) as err:
        get_backend(config).load_pipeline()
    assert str(err.value) == (f"model.backend: 'lcm' needs a Latent Consistency UNet with time_cond_proj_dim, "
                              f"but the UNet of {sd_path!r} has none; use model.backend: sd")


def test_model_without_cross_attention_is_refused(tmp_path):
    folder = tmp_path / "no-attn2"
    shutil.copytree(ensure_tiny_model("tiny"), folder)
    unet = UNet2DConditionModel(sample_size=16, block_out_channels=(32, 64), layers_per_block=1,
                                down_block_types=("DownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "UpBlock2D"), mid_block_type=None,
                                cross_attention_dim=64, norm_num_groups=32)
    shutil.rmtree(folder / "unet")
    unet.save_pretrained(folder / "unet")
    config = load_config("configs/tiny.yaml", [f"model.path={folder}"])
    with pytest.raises(NullBoothError, match=r"has no cross-attention \(attn2\) layers"):
        get_backend(config).load_pipeline()


def test_bad_model_paths(tmp_path):
    (tmp_path / "empty").mkdir()
    cases = {str(tmp_path / "empty"): f"model.path: {str(tmp_path / 'empty')!r} is not a diffusers pipeline folder "
                                      "(no model_index.json)",
             "./nowhere/at/all": "model.path: './nowhere/at/all' is neither a local folder, a hub id (org/name) "
                                 "nor one of 'tiny', 'tiny-lcm', 'toy', 'toy-lcm'"}
    for path, message in cases.items():
        with pytest.raises(NullBoothError) as err:
            get_backend(load_config(None, [f"model.path={path}"])).timestep_plan()
        assert str(err.value) == message


def test_tiny_model_command_builds_a_stock_loadable_pipeline(tmp_path, capsys):
    assert cli_main(["tiny-model", str(tmp_path / "m"), "--backend", "lcm"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "m")
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(tmp_path / "m")
    assert isinstance(pipe, LatentConsistencyModelPipeline)
    assert pipe.unet.config.time_cond_proj_dim is not None
