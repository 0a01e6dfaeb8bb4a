"""The policy JSON: the only interface from probe to runtime.

:mod:`~hermes_policy.policy.document` holds the document itself (schemas ``hermes-policy/1``
and ``/2``, validated on load and before it is written); :mod:`~hermes_policy.policy.paper`
builds the paper's setting for any model.
"""

from hermes_policy.policy.document import (
    GUIDANCE_GLOBAL,
    GUIDANCE_LOCAL,
    HEAD_ROLES,
    REINDEX_MODES,
    SCHEMA,
    SCHEMA_V2,
    SCHEMAS,
    TIERS,
    Guidance,
    HeadPolicy,
    LayerPolicy,
    ModelInfo,
    Policy,
    head_token_budgets,
)
from hermes_policy.policy.paper import paper_default, paper_tiers, split_budget

__all__ = [
    "GUIDANCE_GLOBAL",
    "GUIDANCE_LOCAL",
    "HEAD_ROLES",
    "REINDEX_MODES",
    "SCHEMA",
    "SCHEMAS",
    "SCHEMA_V2",
    "TIERS",
    "Guidance",
    "HeadPolicy",
    "LayerPolicy",
    "ModelInfo",
    "Policy",
    "head_token_budgets",
    "paper_default",
    "paper_tiers",
    "split_budget",
]
