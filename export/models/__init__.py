"""Model kinds of the export stage. Add one = its folder here + its file in agent/models/ + a line below."""

from __future__ import annotations

from lineside.export.models.base import ExportKind
from lineside.export.models.classifier.kind import ClassifierKind
from lineside.export.models.ssd.kind import SSDKind
from lineside.export.models.vae.kind import VAEKind

EXPORT_KINDS: dict[str, ExportKind] = {k.name: k for k in (ClassifierKind(), VAEKind(), SSDKind())}

__all__ = ["EXPORT_KINDS", "ExportKind"]
