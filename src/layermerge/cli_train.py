"""Old path of the training commands (``python -m layermerge.cli_train COMMAND ...`` runs
the whole CLI, as ``python -m layermerge.cli``): :mod:`layermerge.cli.train`."""

import sys

from .cli import main
from .cli.train import register  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())
