"""Stage 3 (generation and report) as a Ray job: `ray job submit --working-dir . -- python jobs/generate.py --config CONFIG [--set k=v]`.

The same as `nullbooth generate`; see `python jobs/generate.py --help`.
"""

import sys
from pathlib import Path

# Submitted with `--working-dir .` the package may not be installed on the cluster: import it from the working dir.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nullbooth.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["generate", *sys.argv[1:]]))
