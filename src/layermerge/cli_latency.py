"""Old path of the ``latency`` and ``benchmark`` commands: :mod:`layermerge.cli.latency`."""

from .cli.latency import cmd_benchmark, cmd_latency, register  # noqa: F401
