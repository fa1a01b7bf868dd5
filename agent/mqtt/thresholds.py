"""Threshold overrides from `set-thresholds`: validated against the bundle's bounds, kept in a state file.

The engine holds the overrides in force (`InferenceEngine.set_threshold_overrides`, applied by `predict`);
this module turns a command into new overrides and keeps them across restarts in
`<state_dir>/thresholds.json`, written atomically (temporary file, fsync, rename, fsync of the folder), so a
crash leaves either the old or the new file, never half of one. Overrides belong to one bundle version: a
different bundle starts from its own calibrated thresholds (the file is then left alone and reported).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from pydantic import ValidationError

from lineside.agent.models import KindThresholds
from lineside.agent.storage import write_json_atomic

STATE_FILE = "thresholds.json"


class ThresholdEngine(Protocol):
    """What overrides need of the engine (agent.inference.engine.InferenceEngine)."""

    def thresholds(self) -> dict[str, KindThresholds]: ...

    def threshold_overrides(self) -> dict[str, KindThresholds]: ...

    def set_threshold_overrides(self, overrides: dict[str, KindThresholds]) -> None: ...


class ThresholdError(ValueError):
    """A request or a state file the bundle does not allow; the message says why."""


def supports_overrides(engine: Any) -> bool:
    return all(hasattr(engine, name) for name in ("thresholds", "threshold_overrides", "set_threshold_overrides"))


def merged_overrides(
    engine: ThresholdEngine, changes: dict[str, dict[str, float]], *, reset: bool = False
) -> dict[str, KindThresholds]:
    """The overrides after applying `changes` (or none after `reset`); raises ThresholdError, changes nothing."""
    bundle = engine.thresholds()
    overrides = {} if reset else engine.threshold_overrides()
    for kind, fields in changes.items():
        if kind not in bundle:
            raise ThresholdError(f"unknown model kind {kind[:64]!r}; this bundle has {sorted(bundle)}")
        bounds = bundle[kind].bounds()
        for name, value in fields.items():
            if name not in bounds:
                raise ThresholdError(
                    f"{kind}.{name[:64]} cannot be set at run time; settable: {sorted(bounds) or 'none'}"
                )
            low, high = bounds[name]
            if not low <= value <= high:
                raise ThresholdError(
                    f"{kind}.{name} = {value:g} is outside the bounds the bundle allows [{low:g}, {high:g}]"
                )
        base = overrides.get(kind, bundle[kind])
        try:
            new = type(base).model_validate({**base.model_dump(), **fields})
        except ValidationError as err:
            problems = "; ".join(
                f"{kind}.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors(include_url=False)
            )
            raise ThresholdError(problems) from err
        if new == bundle[kind]:
            overrides.pop(kind, None)  # back at the calibrated value: no override to keep
        else:
            overrides[kind] = new
    return overrides


def dump(thresholds: dict[str, KindThresholds]) -> dict[str, dict[str, Any]]:
    return {kind: value.model_dump(mode="json") for kind, value in sorted(thresholds.items())}


def save(state_dir: Path, bundle_id: str, bundle_version: str, overrides: dict[str, KindThresholds]) -> Path:
    """Write the state file atomically; returns its path. Raises OSError when it cannot."""
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / STATE_FILE
    body = {
        "bundle_id": bundle_id,
        "bundle_version": bundle_version,
        "overrides": dump(overrides),
        "saved_at": datetime.now(UTC).isoformat(),
    }
    write_json_atomic(path, body)
    return path


def load(state_dir: Path, engine: ThresholdEngine, bundle_id: str, bundle_version: str) -> dict[str, KindThresholds]:
    """The overrides saved for this bundle version; {} without a file. ThresholdError when the file is for
    another bundle, unreadable, or outside today's bounds (then nothing is applied)."""
    path = state_dir / STATE_FILE
    if not path.exists():
        return {}
    try:
        body = json.loads(path.read_text(encoding="utf-8"))
        saved_for = (body["bundle_id"], body["bundle_version"])
        raw = body["overrides"]
        if not isinstance(raw, dict):
            raise TypeError("overrides is not an object")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ThresholdError(f"{path} is unreadable ({type(err).__name__}: {err})") from err
    if saved_for != (bundle_id, bundle_version):
        raise ThresholdError(
            f"{path} holds overrides for bundle {saved_for[0]} {saved_for[1]}, not {bundle_id} {bundle_version}; "
            "this bundle's calibrated thresholds are used"
        )
    bundle = engine.thresholds()
    changes: dict[str, dict[str, float]] = {}
    for kind, fields in raw.items():
        if not isinstance(fields, dict):
            raise ThresholdError(f"{path}: overrides.{kind} is not an object")
        # Only settable fields are ever saved with other values than the bundle's (the engine refuses the rest).
        settable = bundle[kind].bounds() if kind in bundle else fields
        changes[kind] = {k: v for k, v in fields.items() if k in settable}
    return merged_overrides(engine, changes, reset=True)
