"""`python -m hnmix.bench COMMAND`."""

import sys

from hnmix.bench.cli import main

sys.exit(main())
