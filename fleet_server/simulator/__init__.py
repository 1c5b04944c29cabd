"""The fleet simulator: thousands of virtual devices that speak the device protocol.

A tool shipped with the server, to size it (``scripts/simulate-fleet``,
docs/simulator.md), not a test double: each virtual device publishes its retained status
with a Last Will, telemetry every interval and update events over MQTT, and follows its
real, signed director metadata with the agent's own TUF verifier.

    settings.py     what a simulated fleet is (pydantic, unknown keys refused)
    traits.py       what a device of each profile looks like (memory, providers, speed)
    device.py       one virtual device: its models, counters and protocol documents
    link.py         paho clients on an asyncio loop: one MQTT connection
    connections.py  one connection per device, or a few shared ones (load only)
    fetching.py     HTTP: TUF metadata, artifacts, trust roots
    enrol.py        enrolment through the server's API (tokens, CSRs, certificates)
    updates.py      update checks and the transitions a device reports
    fleet.py        the schedule and a run from start to a clean stop
    stats.py        counters, the live summary line, the stats file
    cli.py          ``scripts/simulate-fleet``
"""

from fleet_server.simulator.fleet import Fleet
from fleet_server.simulator.settings import ModelSpec, SimulatorSettings
from fleet_server.simulator.stats import Stats

__all__ = ["Fleet", "ModelSpec", "SimulatorSettings", "Stats"]
