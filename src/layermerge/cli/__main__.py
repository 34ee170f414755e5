"""``python -m layermerge.cli COMMAND ...`` (what torchrun runs)."""

import sys

from . import main

sys.exit(main())
