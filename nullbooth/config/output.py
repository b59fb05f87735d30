"""Putting a config to use: local paths made absolute for Ray's workers, the resolved config as YAML, and the
README's configuration reference generated from the dataclasses."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import yaml

from nullbooth.config.sections import Config
from nullbooth.layout import is_uri


def with_absolute_paths(config: Config) -> Config:
    """The config with its local paths made absolute against this process's working directory.

    Stages hand the config to Ray actors, tasks and Train workers, whose working directory is not the driver's: a
    relative `run_dir` would point somewhere else there. URIs and the "demo" / "tiny" names stay as they are.
    """
    def local(value: str | None, keep: tuple[str, ...] = ()) -> str | None:
        if value is None or value in keep or is_uri(value):
            return value
        return str(Path(value).expanduser().absolute())

    return dataclasses.replace(
        config,
        run_dir=local(config.run_dir),
        preserve=dataclasses.replace(config.preserve, prompts_file=local(config.preserve.prompts_file, ("demo",))),
        train=dataclasses.replace(config.train, storage_path=local(config.train.storage_path),
                                  instance_data_dir=local(config.train.instance_data_dir, ("demo",))),
        generate=dataclasses.replace(config.generate, baseline_run=local(config.generate.baseline_run)),
        # a feature model is a hub id unless a local folder of that name exists here
        eval=dataclasses.replace(config.eval, **{key: local(getattr(config.eval, key)) for key in
                                                ("clip_model", "dino_model")
                                                if Path(getattr(config.eval, key)).expanduser().exists()}),
    )


def config_to_yaml(config: Config) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False, allow_unicode=True)


def reference_table() -> str:
    """The configuration reference as a Markdown table (key, default, meaning), generated from the dataclasses."""
    rows = ["| key | default | meaning |", "|---|---|---|"]

    def walk(cls: type, prefix: str) -> None:
        instance = cls()
        for f in dataclasses.fields(cls):
            default = getattr(instance, f.name)
            if dataclasses.is_dataclass(default):
                walk(type(default), f"{prefix}{f.name}.")
                continue
            meta = f.metadata
            help_text = meta.get("help", "").replace("|", "\\|")  # a bare '|' would end the table cell
            if "choices" in meta:
                help_text += f" ({' / '.join(map(str, meta['choices']))})"
            rows.append(f"| `{prefix}{f.name}` | `{yaml.safe_dump(default, default_flow_style=True).strip().removesuffix('...').strip()}` | {help_text} |")

    walk(Config, "")
    return "\n".join(rows)
