"""Which file the agent loads for each model at start-up: the config's, or an installed update's.

An update that reached COMMITTED is recorded in ``{state_dir}/updates/state.json``; the
agent must load it again after a restart, and must *not* load a version that was still
activating or in probation (that one is rolled back). :func:`with_installed_models` gives
the config with each committed update's store path in place of the configured path.

The operator keeps the last word: when the configured path of a model is no longer the one
it had when the update was installed, the config wins.
"""

from __future__ import annotations

import logging

from agent.config import AgentConfig
from agent.errors import UpdateError
from agent.updater.machine import load_state

log = logging.getLogger("agent.updater")


def with_installed_models(config: AgentConfig) -> AgentConfig:
    """``config`` with the path of every model that has a committed update replaced by it.

    Never raises: an unreadable state leaves ``config`` as it is (logged).
    """
    try:
        state = load_state(config.state_dir / "updates" / "state.json")
    except UpdateError as exc:
        log.error("installed updates ignored: %s", exc.message)
        return config
    models = []
    for mc in config.models:
        installed = state.installed.get(mc.name)
        if installed is None:
            models.append(mc)
        elif installed.config_path is not None and installed.config_path != mc.path:
            log.info("model %s: the config names a new path; installed update ignored", mc.name)
            models.append(mc)
        elif not installed.path.is_file():
            log.error(
                "model %s: installed %s is missing; using the config", mc.name, installed.path
            )
            models.append(mc)
        else:
            models.append(mc.model_copy(update={"path": installed.path}))
    return config.model_copy(update={"models": models})
