"""The one writer of a statistics run's tensor files, which remembers them (and their digests, for the manifest) so a
failure removes exactly what it wrote (the readers are in stats/store.py)."""

from __future__ import annotations

import numpy as np
import torch

from nullbooth.layout import COVARIANCE_DIR, PROJECTION_DIR
from nullbooth.storage import RunDir


class Writer:
    """Writes the run's tensor files and remembers them, so a failure can remove exactly what it wrote."""

    def __init__(self, run: RunDir):
        self.run = run
        self.written: list[str] = []
        self.digests: dict[str, str] = {}  # file -> sha256 of its bytes, recorded in the manifest

    def tensors(self, rel: str, tensors: dict[str, np.ndarray], dtype: torch.dtype) -> None:
        # np.require copies read-only arrays (straight from Ray's object store) that torch cannot wrap.
        self.digests[rel] = self.run.write_tensors(rel, {k: torch.from_numpy(np.require(v, requirements="W")).to(dtype)
                                                         for k, v in tensors.items()})
        self.written.append(rel)

    def remove_all(self) -> None:
        """Delete every file written, then the statistics folders if that left them empty."""
        for rel in self.written:
            try:
                self.run.delete(rel)
            except OSError:
                pass
        for folder in (COVARIANCE_DIR, PROJECTION_DIR):
            if not self.run.listdir(folder):
                self.run.delete(folder)
