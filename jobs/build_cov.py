"""Stage 1 as a Ray job: `ray job submit --working-dir . -- python jobs/build_cov.py --config configs/tiny.yaml`."""

import argparse
import sys
from pathlib import Path

# Submitted with `--working-dir .` the package may not be installed on the cluster: import it from the working dir.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nullbooth.entry import add_config_arguments, config_from_args, guarded


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    add_config_arguments(parser, positional=False)
    parser.add_argument("--force", action="store_true", help="overwrite a complete run made with another config")
    args = parser.parse_args()

    def run() -> None:
        from nullbooth.stats.build import build_covariance

        build_covariance(config_from_args(args), force=args.force)

    return guarded(run)


if __name__ == "__main__":
    sys.exit(main())
