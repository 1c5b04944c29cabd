"""What every pre- and postprocessor looks like, and the geometry that links them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from agent.errors import InferenceError

Array = npt.NDArray[Any]


@dataclass(frozen=True)
class ImageMeta:
    """Where an image came from and how it was fitted to the model input.

    A point ``(x, y)`` of the original image lands at
    ``(x * scale_x + pad_x, y * scale_y + pad_y)`` in the model input.
    """

    original_width: int
    original_height: int
    input_width: int
    input_height: int
    scale_x: float
    scale_y: float
    pad_x: float = 0.0
    pad_y: float = 0.0

    def to_original(self, boxes: Array) -> Array:
        """Map ``[N, 4]`` ``x1, y1, x2, y2`` boxes from model-input pixels back to the
        original image, clipped to its bounds. Returns a new float32 array."""
        out = np.asarray(boxes, dtype=np.float32).reshape(-1, 4).copy()
        out[:, [0, 2]] = (out[:, [0, 2]] - self.pad_x) / self.scale_x
        out[:, [1, 3]] = (out[:, [1, 3]] - self.pad_y) / self.scale_y
        out[:, [0, 2]] = np.clip(out[:, [0, 2]], 0, self.original_width)
        out[:, [1, 3]] = np.clip(out[:, [1, 3]], 0, self.original_height)
        return out


class Preprocessor(Protocol):
    """Turns one request payload into a model input tensor."""

    #: The model input the tensor feeds, or None for "the model's only input".
    input_name: str | None

    def __call__(self, image: bytes | Array) -> tuple[Array, ImageMeta]:
        """Return the model input (batch dimension 1) and how the image was fitted.

        Raises:
            BadInput: the payload does not decode as an image, or is too large.
        """
        ...


class Postprocessor(Protocol):
    """Turns raw model outputs into the reply's ``result`` object."""

    def __call__(self, outputs: dict[str, Array], meta: ImageMeta | None) -> dict[str, Any] | None:
        """Return the ``result`` object, or None when there is none (``raw``).

        ``meta`` is None for a request that sent tensors rather than an image; boxes
        then stay in model-input coordinates.

        Raises:
            InferenceError: the outputs do not have the shape this kind expects.
        """
        ...


def select_output(outputs: dict[str, Array], name: str | None, kind: str) -> Array:
    """The output a postprocessor reads: ``name``, or the only output when None.

    Raises:
        InferenceError: there is no such output, or no name and several outputs.
    """
    if name is not None:
        if name not in outputs:
            raise InferenceError(f"{kind}: the model has no output {name!r}")
        return outputs[name]
    if len(outputs) != 1:
        raise InferenceError(
            f"{kind}: the model has {len(outputs)} outputs; name one in postprocessing.output"
        )
    return next(iter(outputs.values()))
