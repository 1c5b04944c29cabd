"""Fixtures shared by every test package."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytest_plugins = ["tests.broker"]


def _load_fetch_models():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("fetch_models", REPO / "scripts/fetch_models.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["fetch_models"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def models_dir() -> Path:
    """The folder of real models (silero VAD, PP-OCR det/rec/cls, MediaPipe face detectors)."""
    fm = _load_fetch_models()
    return Path(fm.fetch(fm.cache_root() / "models"))
