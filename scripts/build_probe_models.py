#!/usr/bin/env python3
"""Write the probe models that ``edge-agent doctor`` loads on each provider link.

    scripts/build_probe_models.py [--dest DIR]     # default: agent/data

Writes ``probe.onnx`` and ``probe.tflite``: the tiniest valid models, ``y = x + 1`` over a
``[1, 4]`` float32 tensor, a few hundred bytes each. The builders are deterministic, so
running the script again rewrites the same bytes. Needs the ``onnx`` and ``flatbuffers``
packages (dev dependencies), which the agent itself never imports.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def build(dest: Path) -> list[Path]:
    """Write both probe models into ``dest``; return their paths."""
    sys.path.insert(0, str(REPO))
    from tests.modelgen import make_onnx_probe, make_tflite_probe

    dest.mkdir(parents=True, exist_ok=True)
    return [make_onnx_probe(dest / "probe.onnx"), make_tflite_probe(dest / "probe.tflite")]


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").strip().splitlines()[0])
    parser.add_argument("--dest", type=Path, default=REPO / "agent" / "data")
    args = parser.parse_args()
    for path in build(args.dest):
        print(f"{path} ({path.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
