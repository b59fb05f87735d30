"""The run directory: a local path or a cloud URI (s3://, gs://, file://), read and written through pyarrow.

Every write goes to a temporary name first and is then moved into place, so a crash never leaves a file that
looks complete. Only safetensors, JSON and text are read back; nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import uuid
from typing import Any

import numpy as np
import pyarrow.fs as pafs
import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from nullbooth.errors import NullBoothError
from nullbooth.layout import is_uri


def png_bytes(image: Image.Image | np.ndarray) -> bytes:
    """A PIL image or a uint8 (H, W, 3) array encoded as PNG, for `RunDir.write_bytes`."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def sha256_hex(data: bytes) -> str:
    """The digest a manifest records for a file it lists (checked again whenever the file is read)."""
    return hashlib.sha256(data).hexdigest()


def tensors_from_bytes(data: bytes, where: str) -> dict[str, torch.Tensor]:
    """Parse safetensors bytes; anything else (a pickle, a truncated file) is refused, naming `where`."""
    try:
        return load_safetensors_bytes(data)
    except (SafetensorError, ValueError, OSError) as err:
        raise NullBoothError(f"{where} is not a valid safetensors file ({err})") from None


def resolve(location: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or a URI, as Ray Train resolves its storage_path."""
    if is_uri(location):
        try:
            return pafs.FileSystem.from_uri(location)
        except (OSError, ValueError) as err:  # unknown scheme (pyarrow.ArrowInvalid is a ValueError), credentials, ...
            raise NullBoothError(f"cannot open storage {location!r}: {err}") from None
    return pafs.LocalFileSystem(), os.path.abspath(location)


class RunDir:
    """One run's folder. Paths given to the methods are relative to it, with '/' separators."""

    def __init__(self, location: str):
        self.location = location.rstrip("/")
        self.fs, self.root = resolve(self.location)

    def uri(self, rel: str = "") -> str:
        """The location of `rel` in the form the user gave (a URI stays a URI)."""
        return f"{self.location}/{rel}" if rel else self.location

    def _path(self, rel: str) -> str:
        return f"{self.root}/{rel}" if rel else self.root

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    def local_path(self, rel: str = "") -> str:
        """A filesystem path for tools that need one (only for local runs)."""
        if not self.is_local:
            raise NullBoothError(f"{self.uri(rel)} is not on the local filesystem")
        return self._path(rel)

    # -- queries -------------------------------------------------------------------------------------------------
    def exists(self, rel: str) -> bool:
        return self.fs.get_file_info(self._path(rel)).type != pafs.FileType.NotFound

    def listdir(self, rel: str = "") -> list[str]:
        info = self.fs.get_file_info(self._path(rel))
        if info.type != pafs.FileType.Directory:
            return []
        entries = self.fs.get_file_info(pafs.FileSelector(self._path(rel)))
        return sorted(e.base_name for e in entries)

    # -- bytes ---------------------------------------------------------------------------------------------------
    def read_bytes(self, rel: str) -> bytes:
        try:
            with self.fs.open_input_stream(self._path(rel)) as stream:
                return stream.read()
        except FileNotFoundError:
            raise NullBoothError(f"{self.uri(rel)} does not exist") from None
        except OSError as err:
            raise NullBoothError(f"cannot read {self.uri(rel)}: {err}") from None

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write atomically: to a temporary sibling, then move it into place."""
        final = self._path(rel)
        parent = final.rsplit("/", 1)[0]
        self.fs.create_dir(parent, recursive=True)
        temp = f"{parent}/.tmp-{uuid.uuid4().hex}-{final.rsplit('/', 1)[1]}"
        try:
            with self.fs.open_output_stream(temp) as stream:
                stream.write(data)
            self.fs.move(temp, final)
        except BaseException:
            try:
                self.fs.delete_file(temp)
            except OSError:
                pass
            raise

    def delete(self, rel: str) -> None:
        path = self._path(rel)
        info = self.fs.get_file_info(path)
        if info.type == pafs.FileType.Directory:
            self.fs.delete_dir(path)
        elif info.type == pafs.FileType.File:
            self.fs.delete_file(path)

    # -- typed files ---------------------------------------------------------------------------------------------
    def read_json(self, rel: str) -> Any:
        try:
            return json.loads(self.read_bytes(rel))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise NullBoothError(f"{self.uri(rel)} is not valid JSON ({err})") from None

    def write_json(self, rel: str, obj: Any) -> None:
        self.write_bytes(rel, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())

    def read_tensors(self, rel: str) -> dict[str, torch.Tensor]:
        """Load a safetensors file; anything else (a pickle, a truncated file) is refused."""
        return tensors_from_bytes(self.read_bytes(rel), self.uri(rel))

    def write_tensors(self, rel: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> str:
        """Write a safetensors file; returns the sha256 of the bytes written (for the manifest that lists it)."""
        contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        data = save_safetensors_bytes(contiguous, metadata=metadata)
        self.write_bytes(rel, data)
        return sha256_hex(data)
