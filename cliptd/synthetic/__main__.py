"""``python -m cliptd.synthetic --out DIR [--seed 0] [--scale 1.0]``."""

import sys

from cliptd.synthetic.world import main

if __name__ == "__main__":
    sys.exit(main())
