"""The agent's MQTT transport: one small seam, a paho implementation, an in-memory fake.

- :mod:`agent.transport.base`: :class:`Transport` (the seam) and :class:`Message`.
- :mod:`agent.transport.mqtt`: :class:`MqttTransport`, paho-mqtt 2.x, MQTT 5 with a
  fallback to 3.1.1, TLS, TCP_NODELAY, Last Will and birth, jittered reconnects.
- :mod:`agent.transport.memory`: :class:`MemoryBroker` and :class:`MemoryTransport`.
- :mod:`agent.transport.config`: :class:`MqttConfig`, the typed ``mqtt:`` config.
- :mod:`agent.transport.topics`: topic validation and filter matching.

paho is imported only by :mod:`agent.transport.mqtt`; importing this package does not
need it.
"""

from agent.transport.base import MQTT_V5, MQTT_V311, Handler, Message, Transport
from agent.transport.config import MqttConfig, ReconnectConfig, TlsConfig
from agent.transport.memory import MemoryBroker, MemoryTransport
from agent.transport.topics import topic_matches, validate_topic_filter, validate_topic_name

__all__ = [
    "MQTT_V5",
    "MQTT_V311",
    "Handler",
    "MemoryBroker",
    "MemoryTransport",
    "Message",
    "MqttConfig",
    "ReconnectConfig",
    "TlsConfig",
    "Transport",
    "topic_matches",
    "validate_topic_filter",
    "validate_topic_name",
]
