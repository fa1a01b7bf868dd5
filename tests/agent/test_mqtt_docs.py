"""docs/mqtt.md carries the JSON Schema of every MQTT payload, generated from the pydantic models."""

from __future__ import annotations

from pathlib import Path

from lineside.agent.mqtt.payloads import render_schemas

DOC = Path(__file__).resolve().parents[2] / "docs" / "mqtt.md"


def test_the_payload_schemas_in_docs_mqtt_md_are_the_ones_the_models_generate() -> None:
    # given the document's schema section
    text = DOC.read_text(encoding="utf-8")
    section = text.split("<!-- schemas:start -->\n", 1)[1].split("<!-- schemas:end -->", 1)[0]

    # then it is exactly what the models generate (regenerate with python -m lineside.agent.mqtt.payloads)
    assert section == render_schemas()
