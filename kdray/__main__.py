"""``python -m kdray ARGS``: the ``kdray`` command (:func:`kdray.cli.main`), for an environment
whose scripts directory is not on the PATH."""

import sys

from kdray.cli import main

if __name__ == "__main__":
    sys.exit(main())
