"""``python -m lalic``: the ``lalic`` command line without installing its script."""

import sys

from lalic.cli import main

if __name__ == "__main__":
    sys.exit(main())
