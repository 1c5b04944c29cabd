"""Staged OTA rollouts: waves, health gates, pins, and the reconciler that drives them.

- :mod:`~fleet_server.rollouts.domain`: states, transition tables, the rollout spec.
- :mod:`~fleet_server.rollouts.waves`, :mod:`~fleet_server.rollouts.planner`: who goes when.
- :mod:`~fleet_server.rollouts.gates`: health gates (a registry).
- :mod:`~fleet_server.rollouts.reconcile`, :mod:`~fleet_server.rollouts.engine`: ``tick()``.
- :mod:`~fleet_server.rollouts.operations`: operators' actions and pins.
- :mod:`~fleet_server.rollouts.hints`: the ``desired`` hint outbox.
"""
