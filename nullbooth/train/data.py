"""Training data: instance and class images, and the random draws of every optimizer step.

Images are read, checked and resized on the driver (a corrupt file is reported by name before any worker starts)
and shipped to the workers as one uint8 array through the object store, so the workers never need the driver's
local folders. Class images for prior preservation are sampled with the base model by `nullbooth.models.sampler` (Ray Data
batch inference on an actor pool) and cached in `run_dir/class_images/`.

Every random quantity of optimizer step `s` — which images, noise, timesteps, the VAE latent sample — comes from a
generator seeded by (train.seed, s) and is drawn for the whole GLOBAL batch, of which each rank takes its slice.
So the samples do not depend on how the global batch is split across workers and micro-batches, and a resumed run
draws exactly what an uninterrupted one would. The image order is a seeded permutation per epoch (the data order
is a function of the sample counter, stored in the checkpoint).
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from nullbooth.config import Config
from nullbooth.errors import NullBoothError
from nullbooth.layout import CLASS_DIR, CLASS_INFO
from nullbooth.layout import class_image_file as class_image_name
from nullbooth.models.subject import resolve_instance_dir
from nullbooth.storage import RunDir, png_bytes

# ---------------------------------------------------------------------------------------------------------------
# Images


def open_instance_images(value: str, model_path: str = "tiny") -> list[tuple[str, Image.Image]]:
    """(file name, RGB image) for every file of the instance folder, sorted; a file that is not a readable image
    is refused by name (hidden files such as .DS_Store and sub-folders are skipped). "demo" is the drawn subject
    for `model_path`."""
    key = "train.instance_data_dir"
    if value != "demo" and not Path(value).expanduser().is_dir():
        raise NullBoothError(f"{key}: {value!r} is not a directory (use 'demo' for the drawn subject)")
    folder = resolve_instance_dir(value, model_path) if value == "demo" else Path(value).expanduser()
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        raise NullBoothError(f"{key}: {value!r} holds no images")
    images = []
    for path in files:
        try:
            with Image.open(path) as img:
                img.load()
                images.append((path.name, img.convert("RGB")))
        except Image.DecompressionBombError:
            # PIL refuses images past MAX_IMAGE_PIXELS (a header can claim 30000×30000 in a few bytes).
            raise NullBoothError(f"{key}: {path} is too large to be a training image (over "
                                 f"{Image.MAX_IMAGE_PIXELS * 2:,} pixels); resize it first") from None
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
            raise NullBoothError(f"{key}: {path} is not a readable image ({type(err).__name__}: {err})") from None
    return images


def fit_image(img: Image.Image, resolution: int) -> np.ndarray:
    """Resize the shorter side to `resolution` and center-crop to a square: uint8 (resolution, resolution, 3)."""
    w, h = img.size
    scale = resolution / min(w, h)
    size = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))
    img = img.convert("RGB").resize(size, Image.Resampling.BICUBIC)
    left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    return np.asarray(img.crop((left, top, left + resolution, top + resolution)), dtype=np.uint8)


def stack_images(images: list[Image.Image], resolution: int) -> np.ndarray:
    return np.stack([fit_image(img, resolution) for img in images])


def to_pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1], as the VAE expects."""
    return torch.tensor(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # a copy: object-store arrays are read-only


# ---------------------------------------------------------------------------------------------------------------
# Class images (prior preservation)


def class_image_info(config: Config) -> dict:
    """What the cached class images depend on: a cache made with anything else is regenerated."""
    s = config.sampling
    return {"class_prompt": config.train.class_prompt, "model": config.model.path, "backend": config.model.backend,
            "revision": config.model.revision, "scheduler": s.scheduler, "num_inference_steps": s.num_inference_steps,
            "guidance_scale": s.guidance_scale, "negative_prompt": s.negative_prompt, "height": s.height,
            "width": s.width, "seed": config.train.seed}


def ensure_class_images(config: Config) -> list[Image.Image]:
    """The first `train.num_class_images` class images: those cached in run_dir are reused, missing ones are sampled
    with the base model (image i with seed train.seed + i) on a Ray Data actor pool and cached."""
    run = RunDir(config.run_dir)
    info = class_image_info(config)
    want = config.train.num_class_images
    if run.exists(CLASS_INFO) and run.read_json(CLASS_INFO) != info:
        run.delete(CLASS_DIR)  # made for another class prompt or model: stale
    missing = [i for i in range(want) if not run.exists(class_image_name(i))]
    if missing:
        from nullbooth.models.sampler import sample_images

        run.write_json(CLASS_INFO, info)
        rows = sample_images(config, [config.train.class_prompt] * len(missing),
                             [config.train.seed + i for i in missing], num_workers=config.generate.num_workers,
                             batch_size=config.generate.batch_size)
        for i, row in zip(missing, rows):
            run.write_bytes(class_image_name(i), png_bytes(row["image"]))
    images = []
    for i in range(want):
        try:
            with Image.open(io.BytesIO(run.read_bytes(class_image_name(i)))) as img:
                images.append(img.convert("RGB"))
        except (UnidentifiedImageError, OSError) as err:
            raise NullBoothError(f"{run.uri(class_image_name(i))} is not a readable image ({err}); delete it "
                                 "to have it sampled again") from None
    return images


def class_images_generated(config: Config) -> int:
    """How many class images are cached (for the summary)."""
    run = RunDir(config.run_dir)
    return sum(1 for name in run.listdir(CLASS_DIR) if name.startswith("class_") and name.endswith(".png"))


# ---------------------------------------------------------------------------------------------------------------
# The draws of one optimizer step


@dataclass
class StepDraw:
    """Everything random about one optimizer step, for the whole global batch of n samples."""

    instance: torch.Tensor  # (n,) instance image indices
    timesteps: torch.Tensor  # (n,)
    noise: torch.Tensor  # (n, C, h, w)
    latent_eps: torch.Tensor  # (n, C, h, w): the VAE posterior sample is mean + std * eps
    bucket: int | None = None  # timestep mode: the collected timestep whose basis projects this update
    klass: torch.Tensor | None = None  # prior preservation: class image indices, their timesteps, noise, eps
    class_timesteps: torch.Tensor | None = None
    class_noise: torch.Tensor | None = None
    class_eps: torch.Tensor | None = None

    def slice(self, sl: slice) -> StepDraw:
        def cut(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[sl]

        return StepDraw(self.instance[sl], self.timesteps[sl], self.noise[sl], self.latent_eps[sl], self.bucket,
                        cut(self.klass), cut(self.class_timesteps), cut(self.class_noise), cut(self.class_eps))


def epoch_order(seed: int, epoch: int, n: int, stream: int) -> torch.Tensor:
    """The seeded permutation of `n` images for `epoch` (stream 0: instance images, 1: class images)."""
    generator = torch.Generator().manual_seed(_mix(seed, 0x5EED, stream, epoch))
    return torch.randperm(n, generator=generator)


def take(seed: int, start: int, count: int, n: int, stream: int) -> torch.Tensor:
    """Indices of samples start .. start+count-1 of the endless sequence of per-epoch permutations of n images."""
    out, cache = [], {}
    for c in range(start, start + count):
        epoch, pos = divmod(c, n)
        if epoch not in cache:
            cache[epoch] = epoch_order(seed, epoch, n, stream)
        out.append(int(cache[epoch][pos]))
    return torch.tensor(out, dtype=torch.long)


def draw_step(seed: int, step: int, n: int, num_instance: int, latent_shape: tuple[int, ...],
              num_train_timesteps: int, buckets=None, num_class: int = 0, start: int | None = None) -> StepDraw:
    """The draws of optimizer step `step` (1-based) for a global batch of `n` samples.

    `start` is the number of samples drawn before this step (default (step - 1)·n; a run resumed with another
    global batch passes its own count, so the data order continues where it stopped). `buckets` (a
    projection.TimestepBuckets) makes every timestep of the step come from one collected-timestep bucket;
    otherwise timesteps are uniform over [0, num_train_timesteps).
    """
    generator = torch.Generator().manual_seed(_mix(seed, step))
    start = (step - 1) * n if start is None else start
    instance = take(seed, start, n, num_instance, stream=0)
    total = 2 * n if num_class else n  # class samples get their own timesteps, in the same bucket
    if buckets is not None:
        bucket, timesteps = buckets.draw(generator, total)
    else:
        bucket, timesteps = None, torch.randint(0, num_train_timesteps, (total,), generator=generator)
    noise = torch.randn((total, *latent_shape), generator=generator)
    eps = torch.randn((total, *latent_shape), generator=generator)
    draw = StepDraw(instance, timesteps[:n], noise[:n], eps[:n], bucket)
    if num_class:
        draw.klass = take(seed, start, n, num_class, stream=1)
        draw.class_timesteps, draw.class_noise, draw.class_eps = timesteps[n:], noise[n:], eps[n:]
    return draw


def _mix(*values: int) -> int:
    """A 63-bit seed from integers: distinct tuples give unrelated generator streams."""
    digest = hashlib.sha256(repr(tuple(int(v) for v in values)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1
