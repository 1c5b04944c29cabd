"""Calibration and held-out data: a folder of images or arrays, turned into model feeds.

A data folder holds, at its top level (sub-folders and hidden files are ignored):

- images (``.png .jpg .jpeg .bmp .webp``), each run through an image preprocessing
  spec — the same :class:`~agent.processing.config.ImagePreprocessing` a bundle
  manifest declares — into one input tensor with a batch dimension of 1;
- ``.npy`` files, one array each, for a single-input model (a missing leading batch
  dimension is added);
- ``.npz`` files, one array per model input, keyed by input name;
- optionally ``labels.json``: ``{"file name": class index}`` for every data file (or
  none), to measure accuracy against real labels.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from pydantic import TypeAdapter
from pydantic import ValidationError as PydanticValidationError

from agent.errors import EdgeError
from agent.processing.config import ImagePreprocessing
from agent.processing.image import ImagePreprocessor
from fleet_server.quantize.errors import CalibrationError

Array = npt.NDArray[Any]
Feeds = dict[str, Array]

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp"})
ARRAY_SUFFIXES = frozenset({".npy", ".npz"})
LABELS_FILE = "labels.json"
_LABELS = TypeAdapter(dict[str, int])


@dataclass(frozen=True)
class InputInfo:
    """One model input: its name, shape (None for a dynamic dim) and numpy dtype name."""

    name: str
    shape: tuple[int | None, ...]
    dtype: str


@dataclass(frozen=True)
class Sample:
    """One run of the model: its feeds, the file they came from, and its label if known."""

    feeds: Feeds
    source: str
    label: int | None = None


@dataclass(frozen=True)
class CalibrationSet:
    """An ordered set of samples, all labelled or none."""

    samples: tuple[Sample, ...]

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def labelled(self) -> bool:
        return bool(self.samples) and all(s.label is not None for s in self.samples)

    def split(self, fraction: float, seed: int) -> tuple[CalibrationSet, CalibrationSet]:
        """A deterministic ``(calibration, held_out)`` split, ``fraction`` of it held out.

        Raises:
            CalibrationError: fewer than two samples, so nothing can be held out.
        """
        n = len(self.samples)
        if n < 2:
            raise CalibrationError(
                f"{n} sample(s) cannot be split into calibration and held-out data; "
                "add more, or give a separate held-out folder"
            )
        held = min(n - 1, max(1, round(n * fraction)))
        order = np.random.default_rng(seed).permutation(n)
        held_idx = set(order[:held].tolist())
        calib = tuple(s for i, s in enumerate(self.samples) if i not in held_idx)
        held_out = tuple(s for i, s in enumerate(self.samples) if i in held_idx)
        return CalibrationSet(calib), CalibrationSet(held_out)


def load_folder(
    folder: Path, inputs: Sequence[InputInfo], preprocess: ImagePreprocessing | None = None
) -> CalibrationSet:
    """Read every data file of ``folder`` (see the module docstring) into samples.

    Raises:
        CalibrationError: the folder is missing or empty, a file does not load or does not
            fit the model's inputs, images come without a preprocessing spec, or
            ``labels.json`` is malformed or labels only some files.
    """
    if not folder.is_dir():
        raise CalibrationError(f"{folder}: not a folder")
    files = sorted(
        p
        for p in folder.iterdir()
        if p.is_file()
        and not p.name.startswith(".")
        and p.suffix.lower() in IMAGE_SUFFIXES | ARRAY_SUFFIXES
    )
    if not files:
        raise CalibrationError(f"{folder}: no images, .npy or .npz files")
    labels = _read_labels(folder, [p.name for p in files])
    preprocessor = ImagePreprocessor(preprocess) if preprocess is not None else None
    samples = []
    for path in files:
        if path.suffix.lower() in IMAGE_SUFFIXES:
            feeds = _load_image(path, inputs, preprocessor)
        else:
            feeds = _load_arrays(path, inputs)
        _check_fits(path.name, feeds, inputs)
        samples.append(Sample(feeds, path.name, labels.get(path.name)))
    return CalibrationSet(tuple(samples))


def _read_labels(folder: Path, names: list[str]) -> dict[str, int]:
    path = folder / LABELS_FILE
    if not path.is_file():
        return {}
    try:
        labels = _LABELS.validate_python(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, PydanticValidationError) as exc:
        reason = str(exc).splitlines()[0]
        raise CalibrationError(
            f"{path}: not a {{file name: class index}} JSON object: {reason}"
        ) from None
    unknown = sorted(set(labels) - set(names))
    if unknown:
        raise CalibrationError(f"{path}: labels files that are not in the folder: {unknown[:5]}")
    if len(labels) != len(names):
        raise CalibrationError(
            f"{path}: labels {len(labels)} of {len(names)} data files; label all or none"
        )
    if any(v < 0 for v in labels.values()):
        raise CalibrationError(f"{path}: class indices must be >= 0")
    return labels


def _load_image(path: Path, inputs: Sequence[InputInfo], pre: ImagePreprocessor | None) -> Feeds:
    if pre is None:
        raise CalibrationError(
            f"{path.name}: image data needs an image preprocessing spec (the bundle's "
            "'preprocessing', kind: image) to become a model input"
        )
    if len(inputs) != 1:
        raise CalibrationError("image data can only feed a single-input model; use .npz files")
    name = inputs[0].name
    if pre.input_name not in (None, name):
        raise CalibrationError(
            f"the preprocessing spec feeds {pre.input_name!r}, but the model's input is {name!r}"
        )
    try:
        tensor, _ = pre(path.read_bytes())
    except (OSError, EdgeError) as exc:
        raise CalibrationError(f"{path.name}: {getattr(exc, 'message', exc)}") from None
    return {name: tensor}


def _read_numpy(path: Path) -> Array | dict[str, Array]:
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.lib.npyio.NpzFile):
            with loaded:
                return {key: loaded[key] for key in loaded.files}
        return np.asarray(loaded)
    except (OSError, ValueError, EOFError) as exc:
        raise CalibrationError(f"{path.name}: does not load as numpy data: {exc}") from None


def _load_arrays(path: Path, inputs: Sequence[InputInfo]) -> Feeds:
    loaded = _read_numpy(path)
    if isinstance(loaded, dict):
        arrays = loaded
    elif len(inputs) == 1:
        arrays = {inputs[0].name: loaded}
    else:
        names = ", ".join(i.name for i in inputs)
        raise CalibrationError(
            f"{path.name}: a .npy file feeds a single-input model; this one takes "
            f"{names}: use .npz files keyed by input name"
        )
    expected = {i.name for i in inputs}
    if set(arrays) != expected:
        raise CalibrationError(
            f"{path.name}: keys {sorted(arrays)} do not match the model inputs {sorted(expected)}"
        )
    feeds: Feeds = {}
    for info in inputs:
        array = arrays[info.name]
        if array.ndim == len(info.shape) - 1:
            array = array[None]
        if not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_):
            raise CalibrationError(f"{path.name}: {info.name!r} is not numeric ({array.dtype})")
        feeds[info.name] = np.ascontiguousarray(array.astype(info.dtype, copy=False))
    return feeds


def _check_fits(source: str, feeds: Feeds, inputs: Sequence[InputInfo]) -> None:
    for info in inputs:
        array = feeds[info.name]
        if array.dtype != np.dtype(info.dtype):
            raise CalibrationError(
                f"{source}: {info.name!r} is {array.dtype}, the model takes {info.dtype}"
            )
        shape = array.shape
        fits = len(shape) == len(info.shape) and all(
            want is None or want == got for want, got in zip(info.shape, shape, strict=True)
        )
        if not fits:
            want_s = "[" + ", ".join("?" if d is None else str(d) for d in info.shape) + "]"
            raise CalibrationError(
                f"{source}: {info.name!r} has shape {list(shape)}, the model takes {want_s}"
            )
