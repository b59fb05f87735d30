"""What the toy-world probe reads in the samples: does the model still draw what a caption asks for, and is the
subject learned without leaking into its class?

Only for a model folder that ships a probe (the embedded toy-world model, or one made by `nullbooth toy-model
train`); None otherwise. Three shares, each for the base model, the fine-tuned one and the plain-LoRA baseline:

- concept_accuracy: held-out preserved prompts whose samples show the caption's object AND colour;
- subject_fidelity: instance-prompt samples recognised as the demo subject (teal teapot, orange dots, yellow lid);
- class_as_subject: class-prompt samples recognised as the subject (language drift; should stay low).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nullbooth.config import Config
from nullbooth.models.registry import resolve_model_location
from nullbooth.report.plan import PromptSamples

DEFINITION = (
    "Judged by the toy-world probe shipped with the model. concept_accuracy: share of the held-out preserved "
    "prompts' samples whose object and colour (read by the probe) match the caption; subject_fidelity: share of "
    "instance-prompt samples the probe recognises as the demo subject; class_as_subject: the same share for the "
    "class prompt (language drift, should stay low). Per model: base, finetuned, plain (the plain-LoRA baseline).")

MODELS = ("base", "finetuned", "plain")


def find_probe(config: Config) -> Any | None:
    """The probe shipped in the model's folder, or None when the model has none (a real SD checkpoint)."""
    from nullbooth.models.toyworld.probe import PROBE_WEIGHTS, load_probe

    location = Path(resolve_model_location(config.model.path))
    return load_probe(location) if (location / PROBE_WEIGHTS).is_file() else None


def _shares(samples: list[PromptSamples], probe, score) -> dict[str, Any] | None:
    """{"images": n, model: share of images `score(prompt, reading)` accepts} for each model that has images."""
    from nullbooth.models.toyworld.probe import predict

    if not samples:
        return None
    out: dict[str, Any] = {"images": sum(len(e.base) for e in samples)}
    for model in MODELS:
        pairs = [(e.prompt, image) for e in samples for image in getattr(e, model)]
        readings = predict(probe, [image for _, image in pairs]) if pairs else []
        hits = [score(prompt, reading) for (prompt, _), reading in zip(pairs, readings)]
        out[model] = sum(hits) / len(hits) if hits else None
    return out


def probe_section(config: Config, samples: list[PromptSamples]) -> dict[str, Any] | None:
    probe = find_probe(config)
    if probe is None:
        return None
    from nullbooth.models.toyworld.world import parse_caption

    def concept(prompt: str, seen: dict) -> bool:
        wanted = parse_caption(prompt)
        return seen["object"] == wanted[0] and seen["colour"] == wanted[1]

    def subject(prompt: str, seen: dict) -> bool:
        return seen["subject"]

    captions = [e for e in samples if e.kind == "holdout" and None not in parse_caption(e.prompt)[:2]]
    return {"definition": DEFINITION, "concept_accuracy": _shares(captions, probe, concept),
            "subject_fidelity": _shares([e for e in samples if e.kind == "instance"], probe, subject),
            "class_as_subject": _shares([e for e in samples if e.kind == "class"], probe, subject)}
