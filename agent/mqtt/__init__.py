"""MQTT to the line's PLC/SCADA: config, durable outbox, connection, payloads, the service and its sink."""

from __future__ import annotations

from lineside.agent.mqtt.config import MqttConfig
from lineside.agent.mqtt.outbox import Outbox
from lineside.agent.mqtt.service import MqttResultSink, MqttService

__all__ = ["MqttConfig", "MqttResultSink", "MqttService", "Outbox"]
