"""The operator's verbs on a :class:`~tests.e2e.rig.FleetRig`: push releases and run
rollouts with the ``edge-fleet`` CLI, and follow them through the API and the broker."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.e2e.rig import FleetRig, wait_for


@dataclass
class Operator:
    """``edge-fleet model push`` / ``rollout create`` and waiting for their outcome."""

    rig: FleetRig

    def push(self, bundle: Path, *flags: str) -> str:
        """``edge-fleet model push BUNDLE FLAGS``; what it printed."""
        out = self.rig.cli("model", "push", str(bundle), *flags)
        assert out.startswith("published "), out
        return out

    def create_rollout(self, model: str, version: str, *flags: str) -> int:
        """``edge-fleet rollout create --model MODEL@VERSION FLAGS``; the rollout's id."""
        argv = ["rollout", "create", "--model", f"{model}@{version}", *flags, "--json"]
        created: dict[str, Any] = json.loads(self.rig.cli(*argv))
        return int(created["id"])

    def wait_rollout(self, rollout_id: int, state: str, timeout: float) -> dict[str, Any]:
        """The rollout once it is in ``state`` (AssertionError, with the logs, otherwise)."""

        def reached() -> dict[str, Any] | None:
            r: dict[str, Any] = self.rig.api(f"/rollouts/{rollout_id}")
            return r if r["state"] == state else None

        try:
            return wait_for(f"rollout {rollout_id} {state}", reached, timeout, step=0.05)
        except AssertionError as exc:
            shown = self.rig.cli("rollout", "show", str(rollout_id))
            raise AssertionError(f"{exc}\n{shown}\n{self.rig.logs()}") from None

    def rollout_devices(self, rollout_id: int) -> dict[str, dict[str, Any]]:
        """The rollout's devices by id (``GET /api/v1/rollouts/{id}/devices``)."""
        items = self.rig.api(f"/rollouts/{rollout_id}/devices", limit=100)["items"]
        return {d["device_id"]: d for d in items}

    def wait_version(
        self, devices: list[str], model: str, version: str, timeout: float = 30.0
    ) -> None:
        """Until every device's retained status shows ``model`` ready at ``version``."""
        watcher = self.rig.watcher
        assert watcher is not None
        wait_for(
            f"{devices} serving {model} {version}",
            lambda: all(watcher.serving(d, model) == version for d in devices) or None,
            timeout,
        )
