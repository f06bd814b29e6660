"""``python -m subboost``: the same as the ``subboost`` command."""

import sys

from subboost.cli import main

if __name__ == "__main__":
    sys.exit(main())
