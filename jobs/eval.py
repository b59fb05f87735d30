"""Feature-space evaluation as a Ray job: `ray job submit --working-dir . -- python jobs/eval.py --config CONFIG [--set k=v]`.

The same as `nullbooth eval`; see `python jobs/eval.py --help`.
"""

import sys
from pathlib import Path

# Submitted with `--working-dir .` the package may not be installed on the cluster: import it from the working dir.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nullbooth.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
