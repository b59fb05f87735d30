"""The feature extractors of `nullbooth eval`: images (and prompts) -> one feature vector each.

    probe  the toy-world probe's penultimate features (4·width wide), for a model folder that ships a probe
           (`model.path: toy`); no text tower
    clip   a `transformers` CLIPModel (eval.clip_model, hub id or local folder; default openai/clip-vit-large-patch14,
           the original NullBooth's): the projected image embedding (CLIP-I, drift) and text embedding (CLIP-T)
    dino   a `transformers` DINO vision transformer loaded with AutoModel (eval.dino_model; default
           facebook/dinov2-base, a DINOv2 as the original used; facebook/dino-vits16 is the DreamBooth paper's DINO
           ViT-S/16): the CLS token of the last hidden state (after the final layer norm)

Each is loaded inside the Ray task that extracts (report/evaluate.py), never on the driver.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from nullbooth.config import Config
from nullbooth.errors import NullBoothError

BATCH = 32


@dataclass
class Extractor:
    name: str
    model: Any
    processor: Any = None
    tokenizer: Any = None
    device: str = "cpu"

    @property
    def has_text(self) -> bool:
        return self.tokenizer is not None

    @torch.no_grad()
    def images(self, images: list[np.ndarray]) -> np.ndarray:
        """(n, d) float32 features of uint8 (H, W, 3) images."""
        if self.name == "probe":
            from nullbooth.models.toyworld.probe import features

            return features(self.model, list(images)).numpy().astype(np.float32)
        out = []
        for i in range(0, len(images), BATCH):
            pixels = self.processor(images=list(images[i:i + BATCH]), return_tensors="pt")["pixel_values"]
            pixels = pixels.to(self.device, dtype=next(self.model.parameters()).dtype)
            if self.name == "clip":
                out.append(_pooled(self.model.get_image_features(pixel_values=pixels)))
            else:
                out.append(self.model(pixel_values=pixels).last_hidden_state[:, 0])
        return torch.cat(out).float().cpu().numpy()

    @torch.no_grad()
    def texts(self, texts: list[str]) -> np.ndarray:
        """(n, d) float32 text embeddings (CLIP only)."""
        if not self.has_text:
            raise ValueError(f"extractor {self.name!r} has no text tower")
        tokens = self.tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt").to(self.device)
        return _pooled(self.model.get_text_features(**tokens)).float().cpu().numpy()


def _pooled(output: Any) -> torch.Tensor:
    """transformers 5 returns a model output whose pooler_output is the projected embedding; 4.x a tensor."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _load(key: str, location: str, load):
    try:
        return load(location)
    except (OSError, ValueError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise NullBoothError(f"{key}: cannot load {location!r}: {reason}") from None


def load_extractor(name: str, config: Config, device: str = "cpu") -> Extractor:
    """The named extractor, on `device`, in eval mode."""
    if name == "probe":
        from nullbooth.report.probe import find_probe

        probe = find_probe(config)
        if probe is None:
            raise NullBoothError(f"eval.extractors: 'probe' needs a model that ships a probe (e.g. model.path: toy); "
                                 f"{config.model.path!r} has none")
        return Extractor("probe", probe.to(device), device=device)
    if name == "clip":
        from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

        where = config.eval.clip_model
        model = _load("eval.clip_model", where, CLIPModel.from_pretrained)
        processor = _load("eval.clip_model", where, CLIPImageProcessor.from_pretrained)
        tokenizer = _load("eval.clip_model", where, AutoTokenizer.from_pretrained)
        return Extractor("clip", model.eval().to(device), processor, tokenizer, device)
    if name == "dino":
        from transformers import AutoImageProcessor, AutoModel

        where = config.eval.dino_model
        model = _load("eval.dino_model", where, AutoModel.from_pretrained)
        processor = _load("eval.dino_model", where, AutoImageProcessor.from_pretrained)
        return Extractor("dino", model.eval().to(device), processor, device=device)
    raise NullBoothError(f"eval.extractors: unknown extractor {name!r}")


def default_extractors(config: Config) -> list[str]:
    """eval.extractors, or by default the probe for a model that ships one, else CLIP and DINO."""
    if config.eval.extractors:
        return list(config.eval.extractors)
    from nullbooth.report.probe import find_probe

    return ["probe"] if find_probe(config) is not None else ["clip", "dino"]
