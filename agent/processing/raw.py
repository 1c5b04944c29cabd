"""The ``raw`` postprocessor: no ``result``; the reply carries the raw outputs."""

from __future__ import annotations

from typing import Any

from agent.processing.base import Array, ImageMeta


class RawPostprocessor:
    """Returns no result. Used for ``kind: raw`` and for a bundle with no postprocessing."""

    def __call__(self, outputs: dict[str, Array], meta: ImageMeta | None) -> dict[str, Any] | None:
        """Always None: there is nothing to add to the raw outputs."""
        return None
