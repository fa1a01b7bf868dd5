"""Services started after the pipeline; add one = its file (config class + service) + a line here + its
config section in `AgentConfig`."""

from __future__ import annotations

from lineside.agent.services.base import Service, ServicePlugin
from lineside.agent.services.status_log import StatusLogConfig, StatusLogService

# Started in this order, closed in reverse.
PLUGINS: tuple[type[ServicePlugin], ...] = (StatusLogService,)

__all__ = ["PLUGINS", "Service", "ServicePlugin", "StatusLogConfig", "StatusLogService"]
