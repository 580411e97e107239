"""``python -m service``: run the REST service (see ``python -m service --help``)."""

import sys

from service.cli import main

if __name__ == "__main__":
    sys.exit(main())
