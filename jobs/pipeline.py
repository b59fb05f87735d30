"""All three stages as a Ray job: `ray job submit --working-dir . -- python jobs/pipeline.py --config CONFIG [--set k=v]`.

The same as `nullbooth run`; see `python jobs/pipeline.py --help`.
"""

import sys
from pathlib import Path

# Submitted with `--working-dir .` the package may not be installed on the cluster: import it from the working dir.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nullbooth.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
