"""The OpenAPI document of ``serve``, committed beside the JSON Schemas.

Regenerate after changing the API: ``python -m loadwarden.worker.serve.openapi``
(a test fails while the committed file is stale).
"""

from __future__ import annotations

import json
from pathlib import Path

from loadwarden.producer.schemas import HERE
from loadwarden.worker.config import Settings
from loadwarden.worker.serve.app import build_app
from loadwarden.worker.serve.config import ServeConfig

PATH: Path = HERE / "openapi.json"


def render() -> str:
    """The document as generated from the app now (no Redis needed: routes only)."""
    app = build_app(Settings(redis_url="redis://unused"), ServeConfig())
    return json.dumps(app.openapi(), indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":
    PATH.write_text(render())
    print(PATH)
