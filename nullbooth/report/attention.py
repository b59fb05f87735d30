"""Subject-token attention maps: where the rare token ("sks"), the class word and held-out prompts' object words
attend, for the base model, the fine-tuned one and the plain-LoRA baseline.

    targets   generate.attention.prompts ('PROMPT | WORD, WORD'), or by default the instance prompt with its last two
              words (identifier, class word) and the first generate.attention.holdout_prompts held-out prompts with
              their object word; each sampled with the seed of its first image in samples/ (same image)
    tokens    a word's positions come from the model's tokenizer (models/attention.py: word_positions); a word of
              several BPE pieces gets the SUM of its pieces' probabilities (the attention mass on the whole word)
    recording one image per target and model, through models/attention.py (outputs unchanged); in this process,
              or on a GPU worker when the cluster has GPUs
    maps      P(word | image position q) averaged over heads and over the attn2 layers of one resolution, per
              timestep; `map` = that normalised over image positions (Σ_q map = 1: where the word's attention goes),
              `share` = its mean over q (the word's share of the image's attention). The grid shows the mean over
              timesteps of `map` per resolution; report/attention/maps.safetensors keeps every timestep.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from nullbooth.config import Config, parse_attention_entry
from nullbooth.errors import NullBoothError
from nullbooth.prompts import is_toy_world
from nullbooth.report.plan import seeds_for

PIECES_RULE = "sum over the word's tokenizer pieces"
_PREPOSITIONS = {"on", "in", "by", "with", "next", "near", "under", "at", "against", "beside", "over", "above",
                 "below", "inside", "from", "for", "to", "along", "into", "lying", "resting", "leaning", "left",
                 "filled", "full", "arranged", "sitting", "standing"}


@dataclass
class AttentionTarget:
    """One mapped prompt: its words, their token positions (filled by `resolve_positions`) and its seed."""

    prompt: str
    kind: str
    words: list[str]
    seed: int
    positions: dict[str, list[int]] = field(default_factory=dict)


def object_word(prompt: str, model_path: str) -> str:
    """A held-out prompt's object: for the toy world, the one of its objects the caption names; otherwise the last
    word before the first preposition ('a wooden chair in an empty room' -> 'chair'), a heuristic that
    generate.attention.prompts overrides."""
    words = re.findall(r"[a-z0-9]+", prompt.lower())
    if is_toy_world(model_path):
        from nullbooth.models.toyworld.world import OBJECTS

        named = [w for w in words if w in OBJECTS]
        if named:
            return named[0]
    cut = next((i for i, w in enumerate(words) if w in _PREPOSITIONS and i > 0), len(words))
    return words[cut - 1]


def attention_targets(config: Config, plan: list[tuple[str, str]]) -> list[AttentionTarget]:
    """What to map (empty when generate.attention.enabled is false); seeds follow the plan's seed rule."""
    a = config.generate.attention
    if not a.enabled:
        return []
    index = {prompt: j for j, (prompt, _) in enumerate(plan)}
    kinds = dict(plan)

    def seed(prompt: str, fallback: int) -> int:
        j = index.get(prompt, len(plan) + fallback)
        return seeds_for(config, j, kinds.get(prompt, "custom"))[0]

    if a.prompts is not None:
        entries = [parse_attention_entry(e, f"generate.attention.prompts[{i}]") for i, e in enumerate(a.prompts)]
        return [AttentionTarget(p, kinds.get(p, "custom"), words, seed(p, i)) for i, (p, words) in enumerate(entries)]
    instance = config.train.instance_prompt.strip()
    targets = [AttentionTarget(instance, "instance", instance.split()[-2:], seed(instance, 0))]
    held = [p for p, kind in plan if kind == "holdout"][:a.holdout_prompts]
    return targets + [AttentionTarget(p, "holdout", [object_word(p, config.model.path)], seed(p, 0)) for p in held]


def resolve_positions(config: Config, targets: list[AttentionTarget], tokenizer=None) -> None:
    """Each word's token positions, from the model's own tokenizer (before Ray starts: a word the tokenizer cuts
    off is refused now)."""
    from nullbooth.models.attention import word_positions

    if not targets:
        return
    if tokenizer is None:
        from transformers import CLIPTokenizer

        from nullbooth.models.registry import resolve_model_location

        tokenizer = CLIPTokenizer.from_pretrained(resolve_model_location(config.model.path), subfolder="tokenizer",
                                                  revision=config.model.revision)
    for i, target in enumerate(targets):
        try:
            target.positions = {w: word_positions(tokenizer, target.prompt, w) for w in target.words}
        except NullBoothError as err:
            raise NullBoothError(f"generate.attention (prompt {i}): {err}") from None


# -- recording (one process: the driver on a CPU machine, a GPU worker on a GPU cluster) ---------------------------
def record_maps(config: Config, targets: list[AttentionTarget], loras: dict[str, str | None]) -> dict[str, Any]:
    """{"latent": (h, w), "models": {model: {"images": [uint8 HxWx3], "maps": [{word: {(t, n): raw (n,)}}]}}} for
    loras {model: LoRA folder or None (the base model)}, the base first, one batch of all targets per model."""
    from nullbooth.models.attention import record_attention
    from nullbooth.models.backends import get_backend
    from nullbooth.models.sampler import FinetunedModels, sample_batch

    backend = get_backend(config)
    pipe = backend.load_pipeline(backend.device())
    union = sorted({p for t in targets for ps in t.positions.values() for p in ps})
    column = {p: i for i, p in enumerate(union)}
    out: dict[str, Any] = {"latent": tuple(int(s) // pipe.vae_scale_factor for s in backend.image_size(pipe)),
                           "models": {}}
    finetuned = FinetunedModels(pipe)  # a LoRA on the base UNet, or a full fine-tune's own UNet (train.adapter)
    for model, lora_dir in sorted(loras.items(), key=lambda item: item[1] is not None):
        if lora_dir is not None:
            finetuned.add(f"attention-{model}", lora_dir, config.generate.lora_scale, select=True)
        with record_attention(pipe.unet, union, cond_half=backend.uses_guidance) as record:
            images, _ = sample_batch(config, pipe, [t.prompt for t in targets], [t.seed for t in targets])
        maps = [{w: {key: value[b][:, [column[p] for p in ps]].sum(dim=-1).numpy()
                     for key, value in record.mean_maps().items()}
                 for w, ps in t.positions.items()} for b, t in enumerate(targets)]
        out["models"][model] = {"images": list(images), "maps": maps}
    return out


def run_recording(config: Config, targets: list[AttentionTarget], loras: dict[str, str | None]) -> dict[str, Any]:
    """`record_maps` here, or as a Ray task with a GPU when the cluster has GPUs and model.device allows them."""
    import ray

    from nullbooth.cluster import cluster_has_gpu

    if config.model.device != "cpu" and ray.is_initialized() and cluster_has_gpu():
        return ray.get(ray.remote(record_maps).options(num_cpus=1, num_gpus=1).remote(config, targets, loras))
    import torch

    # One thread, as each sampling actor has (one CPU): on a shared machine more threads only spin on each other
    # (the toy model's maps took 3x the CPU time on two threads).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return record_maps(config, targets, loras)
    finally:
        torch.set_num_threads(threads)


# -- summary -------------------------------------------------------------------------------------------------------
def grid_shape(n: int, latent: tuple[int, int]) -> tuple[int, int]:
    """(h, w) of a layer with n image positions, for a latent of `latent` (h, w): each level halves both sides."""
    h, w = latent
    factor = math.sqrt(h * w / n)
    shape = (max(1, round(h / factor)), max(1, round(w / factor)))
    if shape[0] * shape[1] != n:
        raise ValueError(f"attention maps: {n} image positions fit no downsampling of a {h}x{w} latent")
    return shape


def summarise(recorded: dict[str, Any], targets: list[AttentionTarget]) -> list[dict[str, Any]]:
    """Per target: {"prompt", "kind", "seed", "words": {word: positions}, "models": {model: {"image", "words":
    {word: {"share", "per_timestep": {(t, (h, w)): map}, "mean": {(h, w): map}}}}}}; every map sums to 1."""
    out = []
    for j, target in enumerate(targets):
        models = {}
        for model, entry in recorded["models"].items():
            words = {}
            for word, per_key in entry["maps"][j].items():
                # Image positions are flattened row-major (diffusers: (B, C, H, W) -> (B, H*W, C)): back to (h, w)
                per_t = {(t, shape): raw.reshape(shape) / raw.sum()
                         for (t, n), raw in per_key.items() for shape in [grid_shape(n, recorded["latent"])]}
                shares = [float(raw.mean()) for raw in per_key.values()]
                mean = {shape: np.mean([m for (_, s), m in per_t.items() if s == shape], axis=0)
                        for shape in dict.fromkeys(s for _, s in per_t)}
                words[word] = {"share": float(np.mean(shares)), "per_timestep": per_t, "mean": mean}
            models[model] = {"image": entry["images"][j], "words": words}
        out.append({"prompt": target.prompt, "kind": target.kind, "seed": target.seed,
                    "words": dict(target.positions), "models": models})
    return out


# -- files ---------------------------------------------------------------------------------------------------------
DEFINITION = (
    "Cross-attention (attn2) probability of each word, P(word | image position), averaged over heads and over the "
    "attn2 layers of one resolution; with guidance, the conditional branch only. A word of several tokenizer pieces "
    "gets the sum of its pieces. Each map is normalised over image positions (sums to 1: where the word's "
    "attention goes) and averaged over the sampling timesteps; `share` is the word's mean probability over image "
    "positions and timesteps (its share of the image's attention).")


def write_attention(run, summary: list[dict[str, Any]], labels: dict[str, str]) -> dict[str, Any]:
    """Grids (report/attention/NN-<prompt>.png), every per-timestep map (maps.safetensors) and attention.json;
    returns the section report.md shows."""
    import torch

    from nullbooth.layout import ATTENTION_JSON, ATTENTION_MAPS, attention_grid_file
    from nullbooth.report.heatmaps import attention_grid
    from nullbooth.report.plan import slug

    prompts, tensors = [], {}
    for j, entry in enumerate(summary):
        rel = attention_grid_file(j, slug(entry["prompt"]))
        run.write_bytes(rel, attention_grid(entry, labels))
        for model, row in entry["models"].items():
            for word, maps in row["words"].items():
                for (t, (h, w)), value in maps["per_timestep"].items():
                    tensors[f"{model}/{j:02d}/{word}/t{t:04d}/{h}x{w}"] = torch.from_numpy(
                        np.ascontiguousarray(value, dtype=np.float32))
        prompts.append({"prompt": entry["prompt"], "kind": entry["kind"], "seed": entry["seed"],
                        "positions": entry["words"], "grid": rel,
                        "share": {m: {w: v["share"] for w, v in row["words"].items()}
                                  for m, row in entry["models"].items()}})
    run.write_tensors(ATTENTION_MAPS, tensors, metadata={"keys": "model/prompt/word/tTTTT/HxW"})
    section = {"definition": DEFINITION, "pieces": PIECES_RULE, "models": labels, "prompts": prompts,
               "maps": ATTENTION_MAPS}
    run.write_json(ATTENTION_JSON, section)
    return section


def map_attention(config: Config, run, targets: list[AttentionTarget], lora_dir: str,
                  plain_dir: str | None = None) -> dict[str, Any] | None:
    """Record, summarise and write the maps of `targets` for base, fine-tuned and (when trained) plain LoRA;
    None when there is nothing to map (generate.attention.enabled: false)."""
    if not targets:
        return None
    loras = {"base": None, "finetuned": lora_dir, **({"plain": plain_dir} if plain_dir else {})}
    labels = {"base": "base", "finetuned": f"fine-tuned ({config.projection.mode})",
              **({"plain": "plain LoRA (none)"} if plain_dir else {})}
    return write_attention(run, summarise(run_recording(config, targets, loras), targets), labels)
