"""`python -m hnmix.evaluate` and `accelerate launch -m hnmix.evaluate`."""

import sys

from hnmix.evaluate.cli import main

sys.exit(main())
