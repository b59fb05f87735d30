"""What the generation samples: the prompts (instance variants, held-out preserved prompts), their seeds, and the
record (`PromptSamples`) that carries one prompt's images from the sampler to the report.

    prompts   generate.prompts, or by default the instance-prompt variants (does the subject show up?) followed by
              the held-out preserved prompts (the statistics never saw them: does the rest of the model stay put?)
    seeds     image i of prompt j uses generate.seed + SEED_STRIDE·j + i, for the base and the fine-tuned model alike;
              instance and class prompts get generate.subject_images images (when set), the others
              generate.num_images_per_prompt
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from nullbooth.config import Config
from nullbooth.errors import NullBoothError
from nullbooth.prompts import is_toy_world
from nullbooth.storage import RunDir

SEED_STRIDE = 1000  # seed of image i of prompt j: generate.seed + SEED_STRIDE·j + i
KINDS = ("instance", "class", "holdout", "custom")


@dataclass
class PromptSamples:
    """One prompt's samples: the base and fine-tuned images (uint8 H×W×3) and final latents, image i with seeds[i],
    and the plain-LoRA baseline's when the run trains one; `*_files` are the run-relative PNG paths once written."""

    prompt: str
    kind: str
    seeds: list[int] = field(default_factory=list)
    base: list[np.ndarray] = field(default_factory=list)
    finetuned: list[np.ndarray] = field(default_factory=list)
    base_latents: list[np.ndarray] = field(default_factory=list)
    finetuned_latents: list[np.ndarray] = field(default_factory=list)
    base_files: list[str] = field(default_factory=list)
    finetuned_files: list[str] = field(default_factory=list)
    plain: list[np.ndarray] = field(default_factory=list)  # the plain-LoRA baseline (train.plain_baseline)
    plain_latents: list[np.ndarray] = field(default_factory=list)
    plain_files: list[str] = field(default_factory=list)


def seed_rule(config: Config) -> str:
    return f"image i of prompt j: {config.generate.seed} + {SEED_STRIDE}*j + i"


def seeds_for(config: Config, prompt_index: int, kind: str = "custom") -> list[int]:
    g = config.generate
    count = g.subject_images if kind in ("instance", "class") and g.subject_images else g.num_images_per_prompt
    return [g.seed + SEED_STRIDE * prompt_index + i for i in range(count)]


def instance_variants(instance_prompt: str, model_path: str = "") -> list[str]:
    """The instance prompt and three recontextualisations of its subject (as in the DreamBooth paper); for the
    toy-world model, the subject on each of its world's backgrounds (a beach is no place it knows)."""
    prompt = instance_prompt.strip()
    if is_toy_world(model_path):
        from nullbooth.models.toyworld.world import BACKGROUNDS

        return list(dict.fromkeys([prompt, *(f"{prompt} on {place}" for place in BACKGROUNDS.values())]))
    subject = re.sub(r"^(a|an)\s+(photo|picture|image|photograph)\s+of\s+(a\s+|an\s+|the\s+)?", "", prompt,
                     flags=re.IGNORECASE)
    variants = [prompt, f"{prompt} on a beach", f"{prompt} in the snow", f"a painting of {subject}"]
    return list(dict.fromkeys(variants))


def holdout_prompts(config: Config, run: RunDir) -> list[str]:
    """The preserved prompts the statistics held out: the manifest's list, or the config's rule without one."""
    from nullbooth.prompts import preserved_prompts
    from nullbooth.stats.manifest import has_manifest, read_manifest

    if has_manifest(run):
        return list(read_manifest(run).holdout_prompts)
    return preserved_prompts(config)[1]


def plan_prompts(config: Config, run: RunDir) -> list[tuple[str, str]]:
    """[(prompt, kind)] with kind 'instance', 'class' (language drift: the class prompt must not turn into the
    subject), 'holdout' (drift is measured on these) or 'custom'."""
    held = holdout_prompts(config, run)
    variants = instance_variants(config.train.instance_prompt, config.model.path)
    klass = [config.train.class_prompt] if config.train.class_prompt else []
    if config.generate.prompts is None:
        return ([(p, "instance") for p in variants] + [(p, "class") for p in klass if p not in variants]
                + [(p, "holdout") for p in held if p not in variants + klass])
    if not config.generate.prompts:
        raise NullBoothError("generate.prompts: the list is empty; give at least one prompt, or leave "
                             "generate.prompts unset for the instance-prompt variants and the held-out prompts")
    for i, prompt in enumerate(config.generate.prompts):
        if not prompt.strip():
            raise NullBoothError(f"generate.prompts[{i}]: the prompt is empty")
    held_set = set(held)
    return [(p, "holdout" if p in held_set else "instance" if p in variants else "class" if p in klass else "custom")
            for p in config.generate.prompts]


def slug(prompt: str, limit: int = 40) -> str:
    """A file-name-safe form of a prompt."""
    text = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")
    return text[:limit].rstrip("-") or "prompt"
