"""Forward hooks that accumulate the keys' second moments `Σ xxᵀ` while the real sampler runs.

A pre-hook on the UNet reads the timestep of every call (the scheduler's own, so the statistics follow exactly the
trajectory the sampler takes); pre-hooks on each image-side protected layer add `XᵀX` of the layer's input into
that timestep's float64 accumulator. A timestep the plan repeats (`dpm++2m-karras`: `[..., 2, 1, 1, 0]`) has one
accumulator, which every call at that timestep adds to; moments.py says how the global covariance weights it. The
hooks only read the inputs the UNet computes anyway: nothing is recomputed (no attention is redone) and no
activation is kept after its product is added.

Text-side keys (`attn2.to_k` / `attn2.to_v` read `encoder_hidden_states`) are added once per prompt from the
embeddings themselves by `add_text`: the same rows reach every attn2 at every timestep, so hooking those layers
would only count them again. The math itself (packed XᵀX, row counts) is in stats/moments.py; where the sums live
(`covariance.accumulate_on`) is stats/accumulate.py's concern.

Every sum is packed (its upper triangle, stats/moments.py). Once the driver has the reduced total of a key ("text" or
a timestep) it `release`s it: the sums go, and rows for it are not added any more — a replacement actor that redoes
a lost actor's batches during the reduction adds only the keys still to be reduced.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from nullbooth.errors import NullBoothError
from nullbooth.models.layers import key_side
from nullbooth.stats.accumulate import accumulation
from nullbooth.stats.moments import State, image_row_count, packed_gram, text_row_count

PRODUCT_DTYPES = {"float32": torch.float32, "float64": torch.float64}


class KeyStatistics:
    """Packed float64 `Σ xxᵀ` and row counts: one text-side sum, and one per (distinct timestep, image-side layer).
    `timesteps` is the sampler's plan, repeats included; `released` lists keys already reduced (not added again)."""

    def __init__(self, unet: torch.nn.Module, layers: dict[str, torch.nn.Linear], timesteps: list[int],
                 product_dtype: str = "float32", device: torch.device | str = "cpu", accumulate_on: str = "device",
                 released: tuple = ()):
        self.unet = unet
        self.image_layers = {name: layer for name, layer in layers.items() if key_side(name) == "image"}
        self.timesteps = list(timesteps)
        self.product_dtype = PRODUCT_DTYPES[product_dtype]
        self.device = torch.device(device)
        self.accumulate_on = accumulate_on
        self.accumulation = accumulation(accumulate_on, max_pending=max(len(self.image_layers), 1))
        self.text_sums: dict[str, torch.Tensor] = {}
        self.text_rows = 0
        self.image_sums: dict[int, dict[str, torch.Tensor]] = {t: {} for t in self.timesteps}
        self.image_rows: dict[int, dict[str, int]] = {t: {} for t in self.timesteps}
        self.released: set = set()
        for which in released:
            self.release(which)
        self._current: int | None = None
        self._handles: list = []

    # -- text side -----------------------------------------------------------------------------------------------
    def add_text(self, embeddings: torch.Tensor) -> int:
        """Add every row of `embeddings` (prompts × tokens × width); returns the number of rows added."""
        if "text" in self.released:
            return 0
        self.accumulation.add(self.text_sums, "text", packed_gram(embeddings.to(self.device), self.product_dtype))
        rows = text_row_count(embeddings)
        self.text_rows += rows
        return rows

    # -- image side ------------------------------------------------------------------------------------------------
    @contextmanager
    def attached(self) -> Iterator[None]:
        """Hooks on while the block runs; removed afterwards even if sampling fails."""
        self._handles.append(self.unet.register_forward_pre_hook(self._on_unet, with_kwargs=True))
        for name, layer in self.image_layers.items():
            self._handles.append(layer.register_forward_pre_hook(self._layer_hook(name)))
        try:
            yield
            self.accumulation.wait()  # host accumulation: the batch is in the sums before absorb() reports it done
        finally:
            for handle in self._handles:
                handle.remove()
            self._handles.clear()
            self._current = None

    def _on_unet(self, module, args, kwargs) -> None:
        t = args[1] if len(args) > 1 else kwargs["timestep"]
        value = float(t.reshape(-1)[0]) if isinstance(t, torch.Tensor) else float(t)
        label = round(value)
        if label not in self.image_sums:
            raise NullBoothError(f"sampling.scheduler: the sampler called the UNet at timestep {value:g}, which is not "
                                 f"in its timestep plan {self.timesteps}; this sampler cannot be used for statistics")
        self._current = label

    def _layer_hook(self, name: str):
        def hook(module, args) -> None:
            if self._current is None:
                return  # a UNet call outside sampling (none in the pipelines we drive), nothing to attribute it to
            if self._current in self.released:
                return  # reduced already: this call only redoes a lost actor's batches for later timesteps
            x = args[0]
            self.accumulation.add(self.image_sums[self._current], name, packed_gram(x, self.product_dtype))
            rows = self.image_rows[self._current]
            rows[name] = rows.get(name, 0) + image_row_count(x)

        return hook

    # -- export ----------------------------------------------------------------------------------------------------
    def text_state(self) -> State:
        self.accumulation.wait()
        sums = {key: s.cpu().numpy() for key, s in self.text_sums.items()}
        return {"sums": sums, "rows": {"text": self.text_rows} if self.text_rows else {}}

    def image_state(self, t: int) -> State:
        self.accumulation.wait()
        return {"sums": {name: s.cpu().numpy() for name, s in self.image_sums[t].items()},
                "rows": dict(self.image_rows[t])}

    def release(self, which: str | int) -> None:
        """Drop the sums of "text" or a timestep, and add nothing to them from now on (the driver has their total)."""
        self.accumulation.wait()
        self.released.add(which)
        if which == "text":
            self.text_sums.clear()
            self.text_rows = 0
        elif which in self.image_sums:
            self.image_sums[which] = {}
            self.image_rows[which] = {}

    def nbytes(self) -> int:
        """Bytes held by the sums (all keys, wherever they live)."""
        self.accumulation.wait()
        tensors = [*self.text_sums.values(), *(s for sums in self.image_sums.values() for s in sums.values())]
        return sum(s.numel() * s.element_size() for s in tensors)
