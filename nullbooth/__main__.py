import sys

from nullbooth.cli import main

sys.exit(main())
