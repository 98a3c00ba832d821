"""JSON Schema files for LoadRequest and LoadReport, generated from the models.

Regenerate after changing the contract: ``python -m loadwarden.producer.schemas``
(a test fails while the committed files are stale).
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel

from loadwarden.producer.contract import LoadReport, LoadRequest

HERE = Path(__file__).parent
SCHEMAS: dict[str, type[BaseModel]] = {
    "load_request.schema.json": LoadRequest,
    "load_report.schema.json": LoadReport,
}


def render() -> dict[str, str]:
    """Each schema file's name and its text, as generated from the models now."""
    out = {}
    for name, model in SCHEMAS.items():
        schema = model.model_json_schema(
            mode="validation" if model is LoadRequest else "serialization"
        )
        schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}
        out[name] = json.dumps(schema, indent=2, sort_keys=True) + "\n"
    return out


def write() -> list[Path]:
    """Write every schema file next to this module; return their paths."""
    paths = []
    for name, text in render().items():
        path = HERE / name
        path.write_text(text)
        paths.append(path)
    return paths
