"""Read a local input file for ``edge-agent infer`` as a protocol request.

The file is decoded exactly as the same bytes would be over MQTT, so a file that works
here works as a payload: ``.npy`` (one array), ``.jpg``/``.png`` (an image), ``.json``
(a KServe-V2-style request) or an ``ETNS`` binary-tensors file. ``.npz`` archives hold
several named inputs (a local convenience with no wire equivalent).
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from agent.errors import BadRequest
from agent.protocol import InferRequest, PayloadKind, WireTensor, decode_request

#: Local files may be larger than the wire limit.
MAX_FILE_BYTES = 512 * 1024 * 1024

_CONTENT_TYPES = {
    ".npy": "application/x-npy",
    ".json": "application/json",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".png": "image/png",
    ".etns": "application/x-edge-tensors",
}


def read_request(path: Path) -> InferRequest:
    """Decode ``path`` into a request.

    Raises:
        BadRequest: the file is missing, unreadable, or not a valid payload of its kind.
        PayloadTooLarge: the file is over 512 MiB.
    """
    try:
        if path.suffix.lower() == ".npz":
            return _read_npz(path)
        data = path.read_bytes()
    except OSError as exc:
        raise BadRequest(f"{path}: {exc.strerror or exc}") from None
    content_type = _CONTENT_TYPES.get(path.suffix.lower())
    return decode_request(data, content_type=content_type, max_bytes=MAX_FILE_BYTES)


def _read_npz(path: Path) -> InferRequest:
    try:
        with np.load(path, allow_pickle=False) as npz:
            tensors = tuple(WireTensor(name, npz[name]) for name in npz.files)
    except (ValueError, zipfile.BadZipFile) as exc:
        raise BadRequest(f"{path}: not a valid .npz archive ({exc})") from None
    return InferRequest(PayloadKind.NPY, tensors=tensors)
