"""All stages as one Ray job: `ray job submit --working-dir . -- python jobs/pipeline.py [--config CONFIG]`."""

import argparse
import sys
from pathlib import Path

# Submitted with `--working-dir .` the package may not be installed on the cluster: import it from the working dir.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nullbooth.entry import add_config_arguments, config_from_args, guarded


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    add_config_arguments(parser, positional=False, optional=True)
    parser.add_argument("--force", action="store_true", help="redo the statistics even if a run exists")
    args = parser.parse_args()

    def run() -> None:
        from nullbooth.entry import DEFAULT_CONFIG
        from nullbooth.pipeline import run_pipeline

        run_pipeline(config_from_args(args, default=DEFAULT_CONFIG), force=args.force)

    return guarded(run)


if __name__ == "__main__":
    sys.exit(main())
