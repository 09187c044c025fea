"""`python -m hnmix.train` and `accelerate launch -m hnmix.train`."""

import sys

from hnmix.train.loop import main

sys.exit(main())
