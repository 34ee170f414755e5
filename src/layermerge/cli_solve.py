"""Old path of the ``solve`` command: :mod:`layermerge.cli.solve`."""

from .cli.solve import plot_frontier, register, run  # noqa: F401
