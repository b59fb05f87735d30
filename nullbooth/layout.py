"""The layout of a run directory, as code: every file and folder name of a run is defined here, once.

    run_dir/
      covariance/manifest.json          written LAST by the statistics: its presence marks them complete
      covariance/text.safetensors       "cov" (d_text, d_text)
      covariance/tXXXX.safetensors      one (d, d) tensor per image-side protected layer, keyed by layer path
      covariance/global.safetensors     the mean over timesteps, same keys
      projection/<same stems>           "basis" / "eigenvalues" (text), "<layer>.basis" / "<layer>.eigenvalues"
      class_images/                     prior-preservation images sampled by the base model, with info.json
      train/<train.name>/               Ray Train's checkpoints (unless train.storage_path says otherwise)
      lora/pytorch_lora_weights.safetensors   the trained LoRA, diffusers format
      lora/report.json                  what training measured (losses, preservation error)
      lora/unet/config.json, lora/unet/diffusion_pytorch_model.safetensors
                                        train.adapter full: the whole fine-tuned UNet (merged weights, diffusers
                                        format) in place of the LoRA file
      lora-none/                        the same for the plain-LoRA baseline (train.plain_baseline)
      samples/{base,finetuned}/*.png    every generated image; samples/latents.safetensors their final latents
      report/report.json, report.md, grid.png, plots/*.png, compare/
      report/eval.json, eval_features.safetensors   `nullbooth eval`: feature-space metrics and their features

A Ray Train checkpoint folder holds CHECKPOINT_* files plus a copy of lora/ and report.json.
Paths are relative to the run directory, with '/' separators (see nullbooth.storage.RunDir).
"""

from __future__ import annotations

from nullbooth.errors import NullBoothError


def is_uri(location: str) -> bool:
    """Whether a run_dir, storage path or file is a cloud URI (s3://, gs://, file://) rather than a local path."""
    return "://" in location


# -- statistics (stage 1) --------------------------------------------------------------------------------------------
COVARIANCE_DIR = "covariance"
PROJECTION_DIR = "projection"
MANIFEST = f"{COVARIANCE_DIR}/manifest.json"


def file_stem(which: str | int) -> str:
    """"text", "global", or "tXXXX" (4-digit timestep) for an int timestep."""
    if which in ("text", "global"):
        return str(which)
    if isinstance(which, int) and not isinstance(which, bool) and 0 <= which <= 9999:
        return f"t{which:04d}"
    raise NullBoothError(f"covariance selector {which!r}: expected 'text', 'global' or a timestep 0..9999")


def covariance_file(which: str | int) -> str:
    return f"{COVARIANCE_DIR}/{file_stem(which)}.safetensors"


def projection_file(which: str | int) -> str:
    return f"{PROJECTION_DIR}/{file_stem(which)}.safetensors"


# -- training (stage 2) ----------------------------------------------------------------------------------------------
CLASS_DIR = "class_images"
CLASS_INFO = f"{CLASS_DIR}/info.json"
TRAIN_DIR = "train"  # Ray Train's storage_path by default
LORA_DIR = "lora"
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # the name diffusers' load_lora_weights looks for
LORA_FILE = f"{LORA_DIR}/{LORA_WEIGHTS}"
REPORT_NAME = "report.json"  # a training report, in lora/ and in every checkpoint
TRAIN_REPORT = f"{LORA_DIR}/{REPORT_NAME}"
UNET_DIR = "unet"  # train.adapter full: the merged UNet, a diffusers folder, inside lora/
UNET_CONFIG = "config.json"
UNET_WEIGHTS = "diffusion_pytorch_model.safetensors"  # the names UNet2DConditionModel.from_pretrained looks for
BASELINE_LORA_DIR = "lora-none"  # train.plain_baseline: the plain LoRA trained beside the projected one

CHECKPOINT_STATE = "state.json"
CHECKPOINT_TRAINABLE = "trainable.safetensors"
CHECKPOINT_OPTIMIZER = "optimizer.safetensors"
CHECKPOINT_RNG = "rng.safetensors"
FAIL_MARKER = ".nullbooth-injected-failure"  # test aid train.fail_at_step: fail once per experiment folder


def trained_files(adapter: str) -> list[str]:
    """The weight files of a trained adapter, relative to its folder (lora/): a LoRA file or a UNet folder."""
    if adapter == "full":
        return [f"{UNET_DIR}/{UNET_CONFIG}", f"{UNET_DIR}/{UNET_WEIGHTS}"]
    return [LORA_WEIGHTS]


def class_image_file(index: int) -> str:
    return f"{CLASS_DIR}/class_{index:04d}.png"


def checkpoint_dir_name(step: int) -> str:
    return f"checkpoint_step{step:06d}"


# -- generation and report (stage 3) ---------------------------------------------------------------------------------
SAMPLES_DIR = "samples"
LATENTS = f"{SAMPLES_DIR}/latents.safetensors"
REPORT_DIR = "report"
REPORT_JSON = f"{REPORT_DIR}/{REPORT_NAME}"
REPORT_MD = f"{REPORT_DIR}/report.md"
GRID = f"{REPORT_DIR}/grid.png"
COMPARE_DIR = f"{REPORT_DIR}/compare"
EVAL_JSON = f"{REPORT_DIR}/eval.json"  # nullbooth eval: feature-space drift and subject fidelity
EVAL_FEATURES = f"{REPORT_DIR}/eval_features.safetensors"  # the features those numbers were computed from


def sample_file(which: str, prompt_index: int, slug: str, seed: int) -> str:
    """One generated image: `which` is "base" or "finetuned"."""
    return f"{SAMPLES_DIR}/{which}/{prompt_index:02d}-{slug}-{seed}.png"


def single_prompt_file(slug: str, seed: int) -> str:
    """The side-by-side image of `nullbooth generate --prompt`."""
    return f"{SAMPLES_DIR}/prompt/{slug}-{seed}.png"


def plot_file(name: str) -> str:
    return f"{REPORT_DIR}/plots/{name}.png"


def validation_file(step: int) -> str:
    return f"{REPORT_DIR}/validation_step{step:04d}.png"


ATTENTION_DIR = f"{REPORT_DIR}/attention"
ATTENTION_JSON = f"{ATTENTION_DIR}/attention.json"  # tokens, positions, attention shares per model
ATTENTION_MAPS = f"{ATTENTION_DIR}/maps.safetensors"  # every map per timestep and resolution


def attention_grid_file(index: int, slug: str) -> str:
    """The heat-map grid of attention prompt `index`."""
    return f"{ATTENTION_DIR}/{index:02d}-{slug}.png"
