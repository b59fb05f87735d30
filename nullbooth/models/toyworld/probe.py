"""The probe: a small CNN that reads a toy-world image's object, colour and background, and spots the demo subject.

It is the judge of every toy-world evaluation (concept accuracy, subject fidelity) and its penultimate layer is a
feature space for distribution-level comparisons. It is trained on freshly drawn images only, shrunk, blurred and
noised so that the softer images a VAE decodes are read the same way as sharp drawings (`_augment`).
Stored as safetensors (weights) + JSON (architecture, labels, provenance); loading never unpickles anything.
"""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F

from nullbooth.errors import NullBoothError
from nullbooth.models.toyworld import world
from nullbooth.models.toyworld.provenance import code_version, write_json
from nullbooth.prompts import TOY_PROBE_FILE

PROBE_WEIGHTS = TOY_PROBE_FILE  # its presence marks a toy-world model folder (prompts.is_toy_world)
PROBE_JSON = "probe.json"
INPUT_SIZE = 64
HEADS: dict[str, list[str]] = {
    "object": list(world.OBJECTS),
    "colour": list(world.COLOURS),
    "background": list(world.BACKGROUNDS),
    "subject": ["no", "yes"],
}
_IGNORE = -100  # the subject has no world colour: its colour label is left out of the loss


class ProbeNet(nn.Module):
    """A stride-2 stem (64 -> 32 px), three conv stages down to 8 px with BatchNorm, global average pooling, and
    one linear head per concept. Small on purpose: it trains in a couple of minutes on two CPU cores."""

    def __init__(self, width: int = 24) -> None:
        super().__init__()
        chans = [width, 2 * width, 4 * width, 4 * width]
        layers: list[nn.Module] = [nn.Conv2d(3, width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(width),
                                   nn.ReLU(inplace=True)]
        for i in range(3):
            layers += [nn.Conv2d(chans[i], chans[i + 1], 3, padding=1, bias=False), nn.BatchNorm2d(chans[i + 1]),
                       nn.ReLU(inplace=True)]
            if i < 2:
                layers.append(nn.MaxPool2d(2))
        self.body = nn.Sequential(*layers)
        self.heads = nn.ModuleDict({k: nn.Linear(chans[-1], len(v)) for k, v in HEADS.items()})
        self.width = width

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body((x - 0.5) / 0.25).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.features(x)
        return {k: head(f) for k, head in self.heads.items()}


def to_tensor(images: Any) -> torch.Tensor:
    """PIL images or uint8 (H,W,3) arrays (any size), or a float tensor in [0, 1] of shape (N,3,H,W) or (3,H,W)
    -> (N,3,64,64)."""
    if isinstance(images, Image.Image):
        images = [images]
    if isinstance(images, torch.Tensor):
        x = images.float().unsqueeze(0) if images.dim() == 3 else images.float()
        if x.dim() != 4 or x.shape[1] != 3:
            raise NullBoothError(f"probe input: expected a (N,3,H,W) tensor, got shape {tuple(images.shape)}")
        if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
            x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", antialias=True, align_corners=False)
        return x.clamp(0, 1)
    arrays = []
    for im in images:
        if isinstance(im, np.ndarray) and im.dtype == np.uint8 and im.ndim == 3 and im.shape[-1] == 3:
            im = Image.fromarray(im)  # what the samplers return
        if not isinstance(im, Image.Image):
            raise NullBoothError(f"probe input: expected PIL images, uint8 (H,W,3) arrays or a tensor, "
                                 f"got {type(im).__name__}")
        im = im.convert("RGB")
        if im.size != (INPUT_SIZE, INPUT_SIZE):
            im = im.resize((INPUT_SIZE, INPUT_SIZE), Image.Resampling.LANCZOS)
        arrays.append(np.asarray(im, dtype=np.uint8))
    if not arrays:
        raise NullBoothError("probe input: no images")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0


def make_batch(seed: int, start: int, n: int, subject_share: float = 0.2, teapot_share: float = 0.15,
               open_share: float = 0.15) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`n` labelled images of stream `seed`, from `start`: world images, extra world teapots, subject images, and
    open-world images (any colour, teapots with other dots: `world.draw_open_image`), which teach the subject head
    that only the subject's own look counts and carry no colour label."""
    images, labels = [], {k: [] for k in HEADS}
    teapots = [c for c in world.all_combos() if c[0] == "teapot"]
    for i in range(start, start + n):
        r = random.Random(seed * 7_777_777 + i).random()
        if r < subject_share:
            bg = list(world.BACKGROUNDS)[i % len(world.BACKGROUNDS)]
            images.append(world.draw_subject_image(seed * 1_000_000 + i, background=bg))
            obj, col, subj = "teapot", None, 1
        elif r < subject_share + open_share:
            img, obj, bg = world.draw_open_image(seed * 1_000_000 + i)
            images.append(img)
            col, subj = None, 0
        else:
            combos = teapots if r < subject_share + open_share + teapot_share else None
            img, scene = world.sample_scene(seed, i, combos, partial_share=0.0)
            images.append(img)
            obj, col, bg, subj = scene.object, scene.colour, scene.background, 0
        labels["object"].append(HEADS["object"].index(obj))
        labels["colour"].append(HEADS["colour"].index(col) if col else _IGNORE)
        labels["background"].append(HEADS["background"].index(bg))
        labels["subject"].append(subj)
    return to_tensor(images), {k: torch.tensor(v) for k, v in labels.items()}


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable 7-tap Gaussian blur of a (N,3,H,W) batch, as sums of shifted copies (single-channel convolutions
    are slow on CPU)."""
    k = torch.arange(-3, 4, dtype=x.dtype)
    g = torch.exp(-k ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    h, w = x.shape[-2:]
    padded = F.pad(x, (3, 3, 0, 0), mode="replicate")
    x = sum(g[i] * padded[..., :, i:i + w] for i in range(7))
    padded = F.pad(x, (0, 0, 3, 3), mode="replicate")
    return sum(g[i] * padded[..., i:i + h, :] for i in range(7))  # type: ignore[return-value]


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Make drawings look like decoded samples, so the probe reads both alike: 3 in 4 images are shrunk to 16-40 px
    and scaled back (models sample at 32 px; the probe reads 64), half are blended with a blurred copy (a VAE's
    decoder softens edges), all get faint noise. Colours are never changed: colour is a label."""
    n = x.shape[0]
    out = x.clone()
    shrink = torch.rand(n, generator=gen) < 0.75
    sides = torch.randint(16, 41, (n,), generator=gen)
    for side in sides[shrink].unique().tolist():
        idx = torch.nonzero(shrink & (sides == side)).flatten()
        small = F.interpolate(x[idx], size=(side, side), mode="bilinear", antialias=True, align_corners=False)
        out[idx] = F.interpolate(small, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
    mix = (torch.rand(n, 1, 1, 1, generator=gen) < 0.5).float() * torch.rand(n, 1, 1, 1, generator=gen)
    out = out * (1 - mix) + _gaussian_blur(out, 1.5) * mix
    return (out + 0.03 * torch.randn(out.shape, generator=gen)).clamp(0, 1)


def _loss(out: dict[str, torch.Tensor], labels: dict[str, torch.Tensor]) -> torch.Tensor:
    return sum(F.cross_entropy(out[k], labels[k], ignore_index=_IGNORE) for k in HEADS)  # type: ignore[return-value]


def train_probe(*, seed: int = 0, steps: int = 600, batch_size: int = 64, pool_size: int = 8000, lr: float = 3e-3,
                width: int = 24, progress: bool = True) -> tuple[ProbeNet, dict[str, Any]]:
    """Train the probe on a pool of `pool_size` fresh images, seeded; returns it (eval mode) and a training record.

    A fixed pool, drawn once, is cheaper than drawing each batch; at the default size it is seen about six
    times, and the test accuracy is measured on a different image stream (see `evaluate_probe`).
    """
    from tqdm.auto import tqdm

    t0 = time.time()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_pool, y_pool = make_batch(seed * 2 + 1, 0, pool_size)
    net = ProbeNet(width)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1), pct_start=0.15)
    net.train()
    loss = torch.tensor(float("nan"))
    bar = tqdm(range(steps), desc="probe", disable=not progress)
    for _ in bar:
        idx = torch.randint(0, pool_size, (batch_size,), generator=gen)
        out = net(_augment(x_pool[idx], gen))
        loss = _loss(out, {k: v[idx] for k, v in y_pool.items()})
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    net.eval()
    record = {"seed": seed, "steps": steps, "batch_size": batch_size, "pool_size": pool_size, "lr": lr,
              "final_loss": float(loss.item()), "train_seconds": round(time.time() - t0, 1)}
    return net, record


@torch.no_grad()
def evaluate_probe(net: ProbeNet, *, seed: int = 99, n: int = 2000) -> dict[str, float]:
    """Accuracy of each head on `n` fresh images of stream `seed` (colour only where the image has one)."""
    x, y = make_batch(seed, 0, n)
    hits = {k: 0 for k in HEADS}
    counts = {k: 0 for k in HEADS}
    for i in range(0, n, 256):
        out = net(x[i:i + 256])
        for k in HEADS:
            lab = y[k][i:i + 256]
            keep = lab != _IGNORE
            hits[k] += int((out[k].argmax(1)[keep] == lab[keep]).sum())
            counts[k] += int(keep.sum())
    return {k: hits[k] / max(counts[k], 1) for k in HEADS}


def save_probe(net: ProbeNet, out_dir: str | os.PathLike, record: dict[str, Any], accuracy: dict[str, float],
               test: dict[str, int]) -> None:
    """Write probe.safetensors and probe.json (architecture, labels, training record, measured accuracies)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
    save_file(state, str(out / PROBE_WEIGHTS))
    meta = {"format_version": 1, "width": net.width, "input_size": INPUT_SIZE, "heads": HEADS,
            "training": record, "test_accuracy": accuracy, "test_set": test, "code_version": code_version()}
    write_json(out / PROBE_JSON, meta)


def load_probe(folder: str | os.PathLike) -> ProbeNet:
    """The probe saved in `folder` (safetensors + JSON only), in eval mode."""
    folder = Path(folder)
    meta_path, weights = folder / PROBE_JSON, folder / PROBE_WEIGHTS
    if not meta_path.is_file() or not weights.is_file():
        raise NullBoothError(f"probe in {folder}: expected {PROBE_JSON} and {PROBE_WEIGHTS} there")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    if meta.get("heads") != HEADS:
        raise NullBoothError(f"probe in {folder}: its labels {meta.get('heads')} differ from this world's {HEADS}")
    net = ProbeNet(int(meta["width"]))
    net.load_state_dict(load_file(str(weights)))
    return net.eval()


@torch.no_grad()
def predict(net: ProbeNet, images: Any) -> list[dict[str, Any]]:
    """Per image: the probe's object, colour, background, whether it is the subject, and P(subject)."""
    x = to_tensor(images)
    out = {k: torch.cat([net(x[i:i + 256])[k] for i in range(0, len(x), 256)]) for k in HEADS}
    p_subject = out["subject"].softmax(1)[:, 1]
    return [{"object": HEADS["object"][int(out["object"][i].argmax())],
             "colour": HEADS["colour"][int(out["colour"][i].argmax())],
             "background": HEADS["background"][int(out["background"][i].argmax())],
             "subject": bool(p_subject[i] > 0.5), "subject_prob": float(p_subject[i])} for i in range(len(x))]


@torch.no_grad()
def features(net: ProbeNet, images: Any) -> torch.Tensor:
    """Penultimate-layer embeddings (N, 4*width): a feature space for comparing image distributions."""
    x = to_tensor(images)
    return torch.cat([net.features(x[i:i + 256]) for i in range(0, len(x), 256)])
