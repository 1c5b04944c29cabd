"""The ``classification`` postprocessor: the top-k classes of one score vector.

Result shape::

    {"classes": [{"label": "tabby", "index": 281, "score": 0.91}, ...]}

best first, at most ``top_k`` entries; ``label`` is null when the bundle has no labels.
Scores are the model's own (or softmax probabilities with ``softmax: true``), rounded
to 6 decimals. Ties keep the lower class index first.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from agent.errors import InferenceError
from agent.processing.base import Array, ImageMeta, select_output
from agent.processing.config import ClassificationPostprocessing


def softmax(x: Array) -> Array:
    """A numerically stable softmax over the last axis, in float64."""
    z = np.asarray(x, np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    out: Array = e / e.sum(axis=-1, keepdims=True)
    return out


class ClassificationPostprocessor:
    """Runs one :class:`ClassificationPostprocessing` config. Stateless and thread-safe."""

    def __init__(self, config: ClassificationPostprocessing, labels: Sequence[str] | None):
        self.config = config
        self.labels = tuple(labels) if labels is not None else None

    def __call__(self, outputs: dict[str, Array], meta: ImageMeta | None) -> dict[str, Any]:
        """The ``{"classes": [...]}`` result; ``meta`` is not used.

        Raises:
            InferenceError: the output is not one score vector (batch 1), holds
                non-finite values, or its length differs from the number of labels.
        """
        raw = np.asarray(select_output(outputs, self.config.output, "classification"))
        scores = raw.reshape(-1) if raw.size and _is_one_row(raw.shape) else None
        if scores is None:
            raise InferenceError(
                f"classification: expected one score vector, got shape {list(raw.shape)}"
            )
        if self.labels is not None and len(self.labels) != scores.size:
            raise InferenceError(
                f"classification: the output has {scores.size} classes but the bundle has "
                f"{len(self.labels)} labels"
            )
        if not np.all(np.isfinite(scores)):
            raise InferenceError("classification: the output holds NaN or Inf")
        values = softmax(scores) if self.config.softmax else scores.astype(np.float64)
        order = np.argsort(-values, kind="stable")[: self.config.top_k]
        return {
            "classes": [
                {
                    "label": self.labels[i] if self.labels is not None else None,
                    "index": int(i),
                    "score": round(float(values[i]), 6),
                }
                for i in order.tolist()
            ]
        }


def _is_one_row(shape: tuple[int, ...]) -> bool:
    """True for ``[C]``, ``[1, C]``, ``[1, C, 1, 1]``...: at most one dim is not 1."""
    return sum(d != 1 for d in shape) <= 1
