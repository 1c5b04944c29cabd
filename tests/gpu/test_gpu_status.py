"""A real ``edge-agent run`` with a GPU profile: its status names the provider in use.

The agent runs as a subprocess on the session's Mosquitto with ``nvidia-gpu-strict``
(``jetson-orin``'s chain and ``required_accelerator``, with ``strict_placement``), named by
path in its config. It first serves ``scale`` (``y = 2x``, which the GPU runs whole): the
status is ``online`` and names the GPU EP. A reload then adds ``det`` (``y = det(2x)``,
whose ``Det`` no GPU EP implements): strict placement sends it to the CPU, and the status
turns ``degraded``, listing the refused GPU links under the model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.protocol import encode_request
from tests.agent.agent_process import SETTLED, AgentProcess, wait_settled, write_config
from tests.agent.daemon_client import MqttClient, Reply
from tests.agent.updater_models import scale_model
from tests.broker import Mosquitto
from tests.gpu.conftest import CPU_EP, CUDA_EP, TENSORRT_EP, Gpu
from tests.gpu.gpu_models import DET_X, DET_Y, Array, det_model, strict_gpu_profile

pytestmark = [pytest.mark.gpu, pytest.mark.broker, pytest.mark.slow]

DEVICE = "gpu-01"
#: A first TensorRT engine build is part of the start.
SETTLE_TIMEOUT_S = 300.0


def infer(client: MqttClient, model: str, x: Array) -> tuple[Array, str]:
    """One request over MQTT 5; the output ``y`` and the provider the reply names."""
    reply = client.request(
        model,
        encode_request([("x", x)], binary=True),
        device=DEVICE,
        content_type="application/x-edge-tensors",
        timeout=60,
    ).response()
    [y] = [t.array for t in reply.outputs if t.name == "y"]
    return y, reply.provider


def test_the_status_names_the_gpu_provider_and_degrades_on_a_cpu_fallback(
    gpu: Gpu, mosquitto: Mosquitto, tmp_path: Path
) -> None:
    profile = strict_gpu_profile(tmp_path / "profiles")
    scale = {"name": "scale", "path": scale_model(tmp_path / "models" / "scale.onnx", 2.0)}
    det = {"name": "det", "path": det_model(tmp_path / "models" / "det.onnx")}

    def configure(models: list[dict[str, Any]]) -> Path:
        return write_config(
            tmp_path / "agent.yaml",
            url=f"mqtt://127.0.0.1:{mosquitto.port}",
            state_dir=tmp_path / "state",
            models=models,
            device_id=DEVICE,
            profile=str(profile),
        )

    agent = AgentProcess.start(configure([scale]), tmp_path / "agent.log")
    client = MqttClient(mosquitto.port)
    try:
        status = wait_settled(client, agent, DEVICE, ["scale"], SETTLE_TIMEOUT_S)
        assert (status["state"], status["profile"]) == ("online", "nvidia-gpu-strict"), status
        assert status["models"]["scale"]["provider"] == gpu.best
        refused = [f["provider"] for f in status["models"]["scale"].get("fallbacks", [])]
        assert refused == ([] if gpu.tensorrt else [TENSORRT_EP])
        x = np.array([[1.0, 2.0, 3.0, 4.0]], np.float32)
        y, provider = infer(client, "scale", x)
        np.testing.assert_array_equal(y, 2 * x)
        assert provider == gpu.best

        configure([scale, det])
        agent.hup()
        status = client.expect_where(
            f"edge/{DEVICE}/status", lambda m: _settled(m, "det"), SETTLE_TIMEOUT_S
        ).json()
        assert status["state"] == "degraded", status
        det_status = status["models"]["det"]
        assert (det_status["state"], det_status["provider"]) == ("ready", CPU_EP)
        fallbacks = {f["provider"]: f["reason"] for f in det_status["fallbacks"]}
        assert set(fallbacks) == {TENSORRT_EP, CUDA_EP}
        for ep in gpu.usable:
            assert "explicitly disabled" in fallbacks[ep], fallbacks
        assert f"model det: served by {CPU_EP}, not tensorrt or cuda" in status["problems"]
        assert status["models"]["scale"]["provider"] == gpu.best  # unchanged by the reload
        y, provider = infer(client, "det", DET_X)
        np.testing.assert_allclose(y, DET_Y, rtol=1e-5)
        assert provider == CPU_EP

        assert agent.stop(timeout=60) == 0, agent.log()[-4000:]
        agent.assert_clean_log()
    finally:
        client.close()
        if agent.alive:
            agent.kill()


def _settled(message: Reply, model: str) -> bool:
    state = (message.json().get("models") or {}).get(model, {}).get("state")
    return state in SETTLED
