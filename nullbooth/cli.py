"""The `nullbooth` command line. Each subcommand is a thin shell over one component function; the Ray jobs in
jobs/ are shims over the same commands.

A user error (NullBoothError, also when raised inside a Ray actor or task) prints one line and exits with 2;
nothing else is swallowed.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from nullbooth.config import Config, load_config
from nullbooth.errors import user_error

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "toy.yaml"


# ---------------------------------------------------------------------------------------------------------------
# The config arguments and the user-error boundary


def add_config_arguments(parser: argparse.ArgumentParser, optional: bool = False) -> None:
    """CONFIG as a positional argument or as --config (the form `ray job submit` commands use), and --set."""
    default = f" (default: {DEFAULT_CONFIG.name})" if optional else ""
    parser.add_argument("config", nargs="?", default=None, help="YAML config" + default)
    parser.add_argument("--config", dest="config_option", default=None, metavar="CONFIG", help="the same, as an option")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set sampling.num_inference_steps=8 (repeatable)")
    parser.set_defaults(config_optional=optional)


def config_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Config:
    if args.config and args.config_option:
        parser.error("give the config once: as CONFIG or as --config")
    path = args.config or args.config_option
    if path is None:
        if not args.config_optional:
            parser.error("a config is needed: CONFIG or --config CONFIG")
        path = DEFAULT_CONFIG
    return load_config(path, args.overrides)


def guarded(main: Callable[[], int | None]) -> int:
    """Run `main`, turning a user error into one line on stderr and exit status 2."""
    try:
        return main() or 0
    except KeyboardInterrupt:
        print("nullbooth: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - only user errors are handled, the rest is re-raised
        found = user_error(err)
        if found is None:
            raise
        print(f"nullbooth: error: {found}", file=sys.stderr)
        return 2


# ---------------------------------------------------------------------------------------------------------------
# The commands: each takes (config or None, args)


def _validate(config: Config, args: argparse.Namespace) -> None:
    """The resolved config, then the sampler's plan as YAML comments (the output stays valid YAML)."""
    from nullbooth.config import config_to_yaml
    from nullbooth.errors import NullBoothError
    from nullbooth.models.backends import get_backend
    from nullbooth.stats.summary import plan_note

    print(config_to_yaml(config), end="")
    try:
        plan = get_backend(config).timestep_plan()
    except NullBoothError as err:  # e.g. a hub model not cached on this machine: the stages will say more
        print(f"# timestep plan: not computed here ({err})")
        return
    print(f"# timestep plan ({config.sampling.scheduler}, {config.sampling.num_inference_steps} steps): {plan}")
    note = plan_note(plan)
    if note:
        print(f"# note: {note}")


def _timesteps(config: Config, args: argparse.Namespace) -> None:
    """The plan as JSON on stdout; a plan that repeats timesteps is said so on stderr."""
    from nullbooth.models.backends import get_backend
    from nullbooth.stats.summary import plan_note

    plan = get_backend(config).timestep_plan()
    print(json.dumps(plan))
    note = plan_note(plan)
    if note:
        print(f"nullbooth: note: {note}", file=sys.stderr)


def _tiny_model(config: None, args: argparse.Namespace) -> None:
    from nullbooth.models.tiny import build_tiny_model

    print(build_tiny_model(args.out_dir, backend=args.backend))


def _toy_model_train(config: None, args: argparse.Namespace) -> None:
    from nullbooth.models.toyworld.recipe import train_toy_model

    print(train_toy_model(args.out_dir, seed=args.seed, overwrite=args.overwrite))


def _toy_model_distill_lcm(config: None, args: argparse.Namespace) -> None:
    from nullbooth.models.toyworld.distill import distill_toy_lcm

    print(distill_toy_lcm(args.out_dir, teacher=args.teacher, seed=args.seed, steps=args.steps,
                          overwrite=args.overwrite))


def _build_cov(config: Config, args: argparse.Namespace) -> None:
    from nullbooth.stats.build import build_covariance
    from nullbooth.stats.summary import format_summary

    print(format_summary(build_covariance(config, force=args.force)))


def _train(config: Config, args: argparse.Namespace) -> None:
    from nullbooth.train.run import format_summary, train_all

    for summary in train_all(config, force=args.force):  # to stderr, beside Ray Train's own output
        print(format_summary(summary), file=sys.stderr)


def _generate(config: Config, args: argparse.Namespace) -> None:
    from nullbooth.report.generate import format_summary, generate

    print(format_summary(generate(config, prompt=args.prompt)))


def _eval(config: Config, args: argparse.Namespace) -> None:
    from nullbooth.report.eval_report import format_summary
    from nullbooth.report.evaluate import evaluate

    print(format_summary(evaluate(config)))


def _run(config: Config, args: argparse.Namespace) -> None:
    from nullbooth.pipeline import run_pipeline

    run_pipeline(config, force=args.force, announce=print)


def _compare(config: None, args: argparse.Namespace) -> None:
    from nullbooth.report.compare import compare_runs, format_summary

    summary = compare_runs(args.run_a, args.run_b, out_dir=args.out)
    for warning in summary["warnings"]:
        print(f"nullbooth: warning: {warning}", file=sys.stderr)
    print(format_summary(summary))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nullbooth", description="Null-space constrained DreamBooth LoRA on Ray.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, handler, help: str, config: str | None = "required") -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        if config is not None:
            add_config_arguments(p, optional=config == "optional")
        p.set_defaults(handler=handler, reads_config=config is not None, parser=p)
        return p

    command("validate", _validate, "print the resolved config, or the first problem in it")
    command("timesteps", _timesteps, "print the sampler's timestep plan as JSON")
    p = command("tiny-model", _tiny_model, "build the embedded tiny model into a folder", config=None)
    p.add_argument("out_dir")
    p.add_argument("--backend", choices=("sd", "lcm"), default="sd")
    toy = sub.add_parser("toy-model", help="the toy-world model: train it, distill an LCM from it",
                         description="the toy-world model")
    toy_sub = toy.add_subparsers(dest="toy_command", required=True, metavar="ACTION")
    p = toy_sub.add_parser("train", help="train the toy-world model (probe, VAE, UNet) into a folder, seeded, on CPU",
                           description="Train the toy-world model into OUT_DIR: a stock diffusers folder with its "
                                       "probe and provenance.json (about 40 minutes on 2 CPU cores).")
    p.add_argument("out_dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    p.set_defaults(handler=_toy_model_train, reads_config=False, parser=p)
    p = toy_sub.add_parser("distill-lcm", help="distill a Latent Consistency Model from the toy-world model, seeded, "
                                               "on CPU",
                           description="Distill a Latent Consistency Model from an SD teacher (latent consistency "
                                       "distillation) into OUT_DIR: a stock diffusers LatentConsistencyModelPipeline "
                                       "folder with the teacher's probe and provenance.json (about 35 minutes "
                                       "on 2 CPU cores).")
    p.add_argument("out_dir")
    p.add_argument("--teacher", default="toy", help="'toy' (the shipped toy model) or a folder from `toy-model train`")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="distillation steps (default: the recipe's, 4000)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    p.set_defaults(handler=_toy_model_distill_lcm, reads_config=False, parser=p)
    p = command("build-cov", _build_cov, "stage 1: key covariances and null-space bases")
    p.add_argument("--force", action="store_true", help="overwrite a complete run made with another config")
    p = command("train", _train, "stage 2: projected LoRA DreamBooth on Ray Train")
    p.add_argument("--force", action="store_true",
                   help="delete train.name and train afresh if it holds a run of another configuration")
    p = command("generate", _generate, "stage 3: base vs fine-tuned samples and the report")
    p.add_argument("--prompt", default=None, help="generate just this prompt, quickly")
    command("eval", _eval, "feature-space evaluation: drift of held-out prompts' image distributions (FD, MMD, "
                           "precision/recall, density/coverage, 1-NNA) and subject fidelity, into report/eval.json")
    p = command("run", _run, "all stages in one go (default config: configs/toy.yaml)", config="optional")
    p.add_argument("--force", action="store_true",
                   help="rebuild statistics made with another config, and retrain a train.name made with another "
                        "configuration (e.g. those statistics)")
    p = command("compare", _compare, "compare two runs (e.g. global vs none): one table and one plot", config=None)
    p.add_argument("run_a")
    p.add_argument("run_b")
    p.add_argument("--out", default=None, help="folder for the table and plot (default: RUN_A/report/compare)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return guarded(lambda: args.handler(config_from_args(args.parser, args) if args.reads_config else None, args))


if __name__ == "__main__":
    sys.exit(main())
