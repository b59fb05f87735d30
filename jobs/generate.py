"""Stage 3 as a Ray job: `ray job submit --working-dir . -- python jobs/generate.py --config configs/tiny.yaml`."""

import argparse
import sys
from pathlib import Path

# Submitted with `--working-dir .` the package may not be installed on the cluster: import it from the working dir.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nullbooth.entry import add_config_arguments, config_from_args, guarded


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    add_config_arguments(parser, positional=False)
    parser.add_argument("--prompt", default=None, help="generate just this prompt, quickly")
    args = parser.parse_args()

    def run() -> None:
        from nullbooth.generate import generate

        generate(config_from_args(args), prompt=args.prompt)

    return guarded(run)


if __name__ == "__main__":
    sys.exit(main())
