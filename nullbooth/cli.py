"""The `nullbooth` command line. Each subcommand is a thin shell over one component function."""

from __future__ import annotations

import argparse
import json
import sys

from nullbooth.entry import DEFAULT_CONFIG, add_config_arguments, config_from_args, guarded


def _validate(args: argparse.Namespace) -> None:
    from nullbooth.config import config_to_yaml

    print(config_to_yaml(config_from_args(args)), end="")


def _timesteps(args: argparse.Namespace) -> None:
    from nullbooth.backends import get_backend

    print(json.dumps(get_backend(config_from_args(args)).timestep_plan()))


def _tiny_model(args: argparse.Namespace) -> None:
    from nullbooth.tiny import build_tiny_model

    print(build_tiny_model(args.out_dir, backend=args.backend))


def _build_cov(args: argparse.Namespace) -> None:
    from nullbooth.stats.build import build_covariance

    build_covariance(config_from_args(args), force=args.force)


def _train(args: argparse.Namespace) -> None:
    from nullbooth.train.run import train

    train(config_from_args(args))


def _generate(args: argparse.Namespace) -> None:
    from nullbooth.generate import generate

    generate(config_from_args(args), prompt=args.prompt)


def _run(args: argparse.Namespace) -> None:
    from nullbooth.pipeline import run_pipeline

    run_pipeline(config_from_args(args, default=DEFAULT_CONFIG), force=args.force)


def _compare(args: argparse.Namespace) -> None:
    from nullbooth.report import compare_runs

    compare_runs(args.run_a, args.run_b, out_dir=args.out)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nullbooth", description="Null-space constrained DreamBooth LoRA on Ray.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, handler, help: str, **config) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        if config:
            add_config_arguments(p, **config)
        p.set_defaults(handler=handler)
        return p

    command("validate", _validate, "print the resolved config, or the first problem in it", positional=True)
    command("timesteps", _timesteps, "print the sampler's timestep plan as JSON", positional=True)
    p = command("tiny-model", _tiny_model, "build the embedded tiny model into a folder")
    p.add_argument("out_dir")
    p.add_argument("--backend", choices=("sd", "lcm"), default="sd")
    p = command("build-cov", _build_cov, "stage 1: key covariances and null-space bases", positional=True)
    p.add_argument("--force", action="store_true", help="overwrite a complete run made with another config")
    command("train", _train, "stage 2: projected LoRA DreamBooth on Ray Train", positional=True)
    p = command("generate", _generate, "stage 3: base vs fine-tuned samples and the report", positional=True)
    p.add_argument("--prompt", default=None, help="generate just this prompt, quickly")
    p = command("run", _run, "all stages in one go (default config: configs/tiny.yaml)", positional=True,
                optional=True)
    p.add_argument("--force", action="store_true", help="redo the statistics even if a run exists")
    p = command("compare", _compare, "compare two runs (e.g. global vs none): one table and one plot")
    p.add_argument("run_a")
    p.add_argument("run_b")
    p.add_argument("--out", default=None, help="folder for the table and plot (default: RUN_A/report/compare)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return guarded(lambda: args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
