"""The real fleet of the end-to-end tests: a server, an mTLS Mosquitto and three enrolled
agents serving model ``m``, with releases of ``m`` built as real ONNX bundles.

``m`` answers ``y = k * x`` for ``x`` of shape ``[1, 4]``, so a reply tells which version
served it: 0.1.0 (the agents' configured file, k = 0.5), 1.0.0 (k = 1), 2.0.0 (k = 2). 3.0.0 is
``y = log(x)``: right on its golden vector (positive inputs), so the server's validation and
the device's accept it, but NaN for the negative inputs the devices get in probation.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.agent.updater_models import bundle, log_model, scale_model
from tests.e2e.operator import Operator
from tests.e2e.rig import APP, AgentSpec, FleetRig
from tests.e2e.traffic import Traffic, tensor_request

MODEL = "m"
DEVICES = ["berlin-1", "berlin-2", "berlin-3"]
GOLDEN_X = [1.0, 2.0, 3.0, 4.0]
SCALES = {"0.1.0": 0.5, "1.0.0": 1.0, "2.0.0": 2.0}


def build_releases(folder: Path) -> dict[str, Path]:
    """The bundles of ``m`` by version (see the module docstring)."""
    out = {}
    for version, k in SCALES.items():
        onnx = scale_model(folder / version / "m.onnx", k)
        golden = [k * v for v in GOLDEN_X]
        out[version] = bundle(folder / f"m-{version}.tar.gz", onnx, version,
                              golden_x=GOLDEN_X, golden_y=golden, name=MODEL)  # fmt: skip
    log_onnx = log_model(folder / "3.0.0" / "m.onnx")
    logs = [math.log(v) for v in GOLDEN_X]
    out["3.0.0"] = bundle(folder / "m-3.0.0.tar.gz", log_onnx, "3.0.0",
                          golden_x=GOLDEN_X, golden_y=logs, name=MODEL)  # fmt: skip
    return out


@dataclass
class E2EFleet(Operator):
    """The rig and the operator's verbs, an inference client, and the releases of ``m``."""

    traffic: Traffic
    bundles: dict[str, Path]

    def release(self, version: str) -> None:
        """``edge-fleet model push`` the bundle of ``m`` ``version``."""
        assert f"published {MODEL} {version}" in self.push(self.bundles[version])

    def rollout(self, version: str, *flags: str) -> int:
        """``edge-fleet rollout create --model m@VERSION --target site=berlin FLAGS``."""
        return self.create_rollout(MODEL, version, "--target", "site=berlin", *flags)

    def infer(self, device: str, x: list[float] = GOLDEN_X) -> dict[str, Any]:
        """A real inference of ``m`` on ``device`` over MQTT: the reply."""
        return self.traffic.ask(device, MODEL, tensor_request(x))

    def wait_serving(self, devices: list[str], version: str, timeout: float = 30.0) -> None:
        """Until every device's retained status shows ``m`` ready at ``version``."""
        self.wait_version(devices, MODEL, version, timeout)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[E2EFleet]:
    """Three agents enrolled and serving ``m`` 0.1.0 from their config file."""
    root = tmp_path_factory.mktemp("e2e")
    bundles = build_releases(root / "bundles")
    rig = FleetRig(root / "fleet")
    try:
        rig.start()
        models = [{"name": MODEL, "path": str(bundles["0.1.0"])}]
        rig.enrol_agents([AgentSpec(device, models=models) for device in DEVICES])
        traffic = Traffic(rig.mqtt_port, rig.identity(APP).tls(), APP)
        try:
            yield E2EFleet(rig, traffic, bundles)
        finally:
            traffic.close()
    finally:
        rig.close()
