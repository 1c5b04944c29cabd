"""The ``image`` preprocessor: JPEG/PNG bytes (or a decoded array) to a model input tensor.

Steps, in order: check the encoded size in the header (so a small file cannot decode
into gigabytes), decode with OpenCV (EXIF orientation applied; grey and alpha images
become 3-channel BGR, alpha dropped), resize (``stretch`` or ``letterbox`` with a
constant border, centred), reorder colours, ``(pixel * scale - mean) / std``, cast,
lay out as NCHW or NHWC with a batch dimension of 1.
"""

from __future__ import annotations

import struct
from typing import Any

import cv2
import numpy as np

from agent.errors import BadInput
from agent.processing.base import Array, ImageMeta
from agent.processing.config import ImagePreprocessing

#: Largest decoded image accepted, in pixels (about 120 MB of BGR bytes).
DEFAULT_MAX_PIXELS = 40_000_000

_INTERPOLATION = {
    "linear": cv2.INTER_LINEAR,
    "nearest": cv2.INTER_NEAREST,
    "area": cv2.INTER_AREA,
    "cubic": cv2.INTER_CUBIC,
}
_INT_RANGE = {"uint8": (0, 255), "int8": (-128, 127)}
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_SOF = frozenset(
    {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
)


def encoded_size(data: bytes | bytearray) -> tuple[int, int]:
    """``(width, height)`` of a PNG or JPEG, read from its header without decoding.

    Raises:
        BadInput: the bytes are not a PNG or JPEG, or their header is truncated.
    """
    if data.startswith(_PNG_MAGIC):
        if len(data) < 24 or data[12:16] != b"IHDR":
            raise BadInput("image does not decode: truncated PNG header")
        width, height = struct.unpack(">II", data[16:24])
        return int(width), int(height)
    if data.startswith(b"\xff\xd8"):
        return _jpeg_size(data)
    raise BadInput("image does not decode: not a JPEG or PNG")


def _jpeg_size(data: bytes | bytearray) -> tuple[int, int]:
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            raise BadInput("image does not decode: corrupt JPEG markers")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD9)):  # markers without a length
            pos += 2
            continue
        (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        if marker in _JPEG_SOF:
            if pos + 9 > len(data):
                break
            height, width = struct.unpack(">HH", data[pos + 5 : pos + 9])
            return int(width), int(height)
        pos += 2 + length
    raise BadInput("image does not decode: no JPEG frame header")


class ImagePreprocessor:
    """Runs one :class:`ImagePreprocessing` config. Stateless and thread-safe."""

    def __init__(self, config: ImagePreprocessing, *, max_pixels: int = DEFAULT_MAX_PIXELS):
        self.config = config
        self.input_name = config.input
        self.max_pixels = max_pixels
        channels = config.channels
        mean = np.broadcast_to(np.asarray(config.mean, np.float32), (channels,))
        std = np.broadcast_to(np.asarray(config.std, np.float32), (channels,))
        self._identity = config.scale == 1.0 and not mean.any() and bool(np.all(std == 1))
        self._mean = mean.copy()
        self._std = std.copy()

    def __call__(self, image: bytes | Array) -> tuple[Array, ImageMeta]:
        """Decode (if bytes), fit and normalise one image; see the module docstring.

        An array is taken as OpenCV lays images out: uint8, ``HxW`` grey or ``HxWxC``
        with C = 1, 3 (BGR) or 4 (BGRA).

        Raises:
            BadInput: the image does not decode, is not uint8, or has too many pixels.
        """
        img = self._decode(image) if isinstance(image, bytes | bytearray) else self._adopt(image)
        fitted, meta = self._fit(img)
        return self._normalise(fitted), meta

    # --- decoding -------------------------------------------------------------------

    def _decode(self, data: bytes | bytearray) -> Array:
        width, height = encoded_size(data)
        self._check_pixels(width, height)
        flag = cv2.IMREAD_GRAYSCALE if self.config.color == "gray" else cv2.IMREAD_COLOR
        try:
            img: Array | None = cv2.imdecode(np.frombuffer(data, np.uint8), flag)
        except cv2.error:
            img = None
        if img is None or img.size == 0:
            raise BadInput("image does not decode")
        return img

    def _adopt(self, image: Array) -> Array:
        if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
            raise BadInput("image array must be uint8")
        if image.ndim == 3 and image.shape[2] == 1:
            image = image[:, :, 0]
        if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (3, 4)):
            raise BadInput(f"image array must be HxW, HxWx3 or HxWx4, got {list(image.shape)}")
        if image.shape[0] == 0 or image.shape[1] == 0:
            raise BadInput("image array is empty")
        self._check_pixels(image.shape[1], image.shape[0])
        gray = self.config.color == "gray"
        if image.ndim == 2:
            return image if gray else cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
        if image.shape[2] == 4:
            return cv2.cvtColor(image, cv2.COLOR_BGRA2GRAY if gray else cv2.COLOR_BGRA2BGR)
        return cv2.cvtColor(image, cv2.COLOR_BGR2GRAY) if gray else image

    def _check_pixels(self, width: int, height: int) -> None:
        if width * height > self.max_pixels:
            raise BadInput(f"image is {width}x{height}, over the limit of {self.max_pixels} pixels")

    # --- geometry ---------------------------------------------------------------------

    def _fit(self, img: Array) -> tuple[Array, ImageMeta]:
        cfg = self.config
        h, w = img.shape[:2]
        out_w, out_h = cfg.width, cfg.height
        interp = _INTERPOLATION[cfg.interpolation]
        if cfg.resize == "stretch":
            if (w, h) != (out_w, out_h):
                img = cv2.resize(img, (out_w, out_h), None, 0, 0, interp)
            return img, ImageMeta(w, h, out_w, out_h, out_w / w, out_h / h)
        ratio = min(out_w / w, out_h / h)
        new_w = min(out_w, max(1, round(w * ratio)))
        new_h = min(out_h, max(1, round(h * ratio)))
        if (new_w, new_h) != (w, h):
            img = cv2.resize(img, (new_w, new_h), None, 0, 0, interp)
        left, top = (out_w - new_w) // 2, (out_h - new_h) // 2
        pad: Any = cfg.pad_value if img.ndim == 2 else (cfg.pad_value,) * 3
        bottom, right = out_h - new_h - top, out_w - new_w - left
        boxed = cv2.copyMakeBorder(img, top, bottom, left, right, cv2.BORDER_CONSTANT, value=pad)
        meta = ImageMeta(w, h, out_w, out_h, new_w / w, new_h / h, float(left), float(top))
        return boxed, meta

    # --- values -----------------------------------------------------------------------

    def _normalise(self, img: Array) -> Array:
        cfg = self.config
        if cfg.color == "rgb":
            img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
        if img.ndim == 2:
            img = img[:, :, None]
        if self._identity and cfg.dtype == "uint8":
            values: Array = img
        else:
            values = img.astype(np.float32)
            if cfg.scale != 1.0:
                values *= np.float32(cfg.scale)
            values -= self._mean
            values /= self._std
            if cfg.dtype in _INT_RANGE:
                low, high = _INT_RANGE[cfg.dtype]
                values = np.clip(np.rint(values), low, high).astype(cfg.dtype)
            elif cfg.dtype != "float32":
                values = values.astype(cfg.dtype)
        if cfg.layout == "nchw":
            values = values.transpose(2, 0, 1)
        return np.ascontiguousarray(values[None])
