"""Services started after the pipeline; add one = its file (config class + service) + a line here + its
config section in `AgentConfig`."""

from __future__ import annotations

from lineside.agent.mqtt.service import MqttService
from lineside.agent.s3.updates import UpdatesConfig, UpdatesService
from lineside.agent.s3.uploads import UploadsConfig, UploadsService
from lineside.agent.services.base import Service, ServicePlugin
from lineside.agent.services.health import HealthConfig, HealthService
from lineside.agent.services.notify import NotifyConfig, NotifyService
from lineside.agent.services.status_log import StatusLogConfig, StatusLogService

# Started in this order, closed in reverse. Health after MQTT and uploads: its metrics sink must come after
# theirs. Uploads and updates after MQTT: their events reach MQTT's outbox until they have stopped, and
# activate-bundle finds the updater running.
PLUGINS: tuple[type[ServicePlugin], ...] = (
    StatusLogService,
    MqttService,
    UploadsService,
    UpdatesService,
    HealthService,
    NotifyService,
)

__all__ = [
    "PLUGINS",
    "HealthConfig",
    "HealthService",
    "MqttService",
    "NotifyConfig",
    "NotifyService",
    "Service",
    "ServicePlugin",
    "StatusLogConfig",
    "StatusLogService",
    "UpdatesConfig",
    "UpdatesService",
    "UploadsConfig",
    "UploadsService",
]
