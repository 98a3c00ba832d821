"""The contract's shared vocabulary: its version, value types, outcomes and formats.

The outcomes and formats live in ``loadwarden.producer.outcomes`` (no pydantic), which the
contract re-exports.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

#: Bumped on any incompatible change to LoadRequest or LoadReport.
WIRE_VERSION: Literal[1] = 1

Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$", description="lower-case hex sha256")]
NonNegInt = Annotated[int, Field(ge=0)]
NonNegFloat = Annotated[float, Field(ge=0, allow_inf_nan=False)]
#: A finite, positive duration (JSON has no infinity; neither do our limits).
PositiveSeconds = Annotated[float, Field(gt=0, allow_inf_nan=False)]
#: A trusted signer's name in a worker's settings (``signing.signers``), or ``*``: any of them.
SignerName = Annotated[
    str,
    Field(
        pattern=r"^(\*|[A-Za-z0-9][A-Za-z0-9._-]{0,63})$",
        description="a signer the worker trusts, by the name its settings give it; * is any",
    ),
]
#: The signers a model must be signed by, one of them (worker settings, catalog, request).
SignedBy = Annotated[tuple[SignerName, ...], Field(min_length=1, max_length=16)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
