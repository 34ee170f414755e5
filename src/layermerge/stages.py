"""Old import path of :mod:`layermerge.pipeline.stages` (cached pipeline stages)."""

from .pipeline.stages import STATE_FILE, STATE_SCHEMA, StageRunner, digest, file_digest

__all__ = ["STATE_FILE", "STATE_SCHEMA", "StageRunner", "digest", "file_digest"]
