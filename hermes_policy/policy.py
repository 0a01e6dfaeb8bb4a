"""The policy JSON (schema ``hermes-policy/1``): the only interface from probe to runtime.

A policy is data, never code. It is validated field by field when loaded and before it is
written, and checked against the model it is used with. :func:`paper_default` builds the
paper's 10/60/30 setting for any layer count (METHOD.md sections 3-5).
"""

from __future__ import annotations

import json
import math
import string
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from hermes_policy.errors import PolicyError
from hermes_policy.fileio.atomic import write_json_atomic
from hermes_policy.fileio.json_input import load_json_file

SCHEMA = "hermes-policy/1"
TIERS = ("sensory", "working", "long_term")
REINDEX_MODES = ("lazy", "eager")

GUIDANCE_LOCAL = (
    "Describe the current scene in detail, focusing on specific objects, fine-grained actions, "
    "and spatial relationships."
)
GUIDANCE_GLOBAL = (
    "Summarize the video narrative, identifying main characters, key events, timeline changes, "
    "and the overall theme."
)

# Paper constants (METHOD.md sections 3-4).
PAPER_TIER_FRACTIONS = (0.1, 0.6, 0.3)
PAPER_SMOOTHING = {"sensory": 0.1, "working": 0.3, "long_term": 0.4}
PAPER_FORGETTING_SHALLOW = 20.0
PAPER_FORGETTING_MIDDLE_END = 8.0
PAPER_W0, PAPER_G = 0.75, 0.6


@dataclass(frozen=True)
class ModelInfo:
    """What a policy was made for; checked against the model it is used with."""

    name_or_path: str
    architecture: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    tokens_per_frame: int


    @classmethod
    def of(cls, adapter: Any) -> ModelInfo:
        """The shape of a loaded model (a :class:`~hermes_policy.models.base.ModelAdapter`)."""
        return cls(
            name_or_path=adapter.name_or_path,
            architecture=adapter.architecture,
            num_layers=adapter.num_layers,
            num_heads=adapter.num_heads,
            num_kv_heads=adapter.num_kv_heads,
            tokens_per_frame=adapter.tokens_per_frame,
        )


@dataclass(frozen=True)
class LayerPolicy:
    """Retention parameters of one layer.

    recency_weight : w_l, 1 = pure recency score, 0 = pure attention score
    forgetting_rate : k in ``exp(-k * dt / (T - 1))``
    smoothing : lambda_l of cross-layer smoothing (deep to shallow)
    budget : stream tokens this layer keeps
    summary_token : fold evicted tokens into one summary token (long-term layers)
    """

    index: int
    tier: str
    recency_weight: float
    forgetting_rate: float
    smoothing: float
    budget: int
    summary_token: bool


@dataclass(frozen=True)
class Guidance:
    """Pseudo-query prompts; the ``*_with_history`` variants contain ``{history}``."""

    local: str = GUIDANCE_LOCAL
    global_: str = GUIDANCE_GLOBAL
    local_with_history: str = "Find recent details related to: {history}. " + GUIDANCE_LOCAL
    global_with_history: str = "Context summary: {history}. " + GUIDANCE_GLOBAL

    def to_dict(self) -> dict[str, str]:
        return {
            "local": self.local,
            "global": self.global_,
            "local_with_history": self.local_with_history,
            "global_with_history": self.global_with_history,
        }


@dataclass
class Policy:
    """A validated ``hermes-policy/1`` document."""

    model: ModelInfo
    budget: int
    tiers: dict[str, tuple[int, int]]
    layers: list[LayerPolicy]
    guidance: Guidance = field(default_factory=Guidance)
    reindex: str = "lazy"
    provenance: dict[str, Any] = field(default_factory=dict)

    # -- (de)serialisation -----------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "model": asdict(self.model),
            "budget": {"video_tokens_per_layer": self.budget},
            "tiers": {name: list(self.tiers[name]) for name in TIERS},
            "layers": [asdict(layer) for layer in self.layers],
            "guidance": self.guidance.to_dict(),
            "reindex": self.reindex,
            "provenance": self.provenance,
        }

    @classmethod
    def from_dict(cls, data: Any, source: str = "policy") -> Policy:
        """Parse and validate; every problem raises :class:`PolicyError` naming the field."""
        return _parse(data, source)

    @classmethod
    def load(cls, path: str | Path) -> Policy:
        path = Path(path)
        if not path.is_file():
            raise PolicyError(f"policy file not found: {path}")
        return _parse(load_json_file(path, error=PolicyError), str(path))

    def save(self, path: str | Path) -> Path:
        """Validate, then write atomically (temp file in the same folder, then rename)."""
        data = self.to_dict()
        _parse(json.loads(json.dumps(data)), "policy to write")
        return write_json_atomic(path, data)

    # -- use -------------------------------------------------------------------------
    def with_budget(self, budget: int) -> Policy:
        """This policy at another budget: ``budget`` stream tokens per layer, per-layer
        budgets scaled in proportion (never below one frame); provenance notes the change."""
        if budget < self.model.tokens_per_frame:
            raise PolicyError(f"budget {budget} is smaller than one frame ({self.model.tokens_per_frame} tokens)")
        scale = budget / self.budget
        layers = [replace(layer, budget=max(self.model.tokens_per_frame, round(layer.budget * scale)))
                  for layer in self.layers]
        provenance = {**self.provenance, "budget_override": {"from": self.budget, "to": budget}}
        return replace(self, budget=budget, layers=layers, provenance=provenance)

    def check_model(self, num_layers: int, num_heads: int, num_kv_heads: int, tokens_per_frame: int) -> None:
        """Raise PolicyError when the policy was made for a model of another shape."""
        expected = {
            "num_layers": num_layers,
            "num_heads": num_heads,
            "num_kv_heads": num_kv_heads,
            "tokens_per_frame": tokens_per_frame,
        }
        for key, value in expected.items():
            if getattr(self.model, key) != value:
                raise PolicyError(
                    f"policy was made for a model with {key}={getattr(self.model, key)} "
                    f"({self.model.name_or_path}), this model has {key}={value}"
                )

    def tier_of(self, layer: int) -> str:
        return self.layers[layer].tier


def paper_tiers(num_layers: int) -> dict[str, tuple[int, int]]:
    """The paper's 10% / 60% / 30% split, each tier at least one layer."""
    if num_layers < 3:
        raise PolicyError(f"a model needs at least 3 layers for three tiers, got {num_layers}")
    n_sensory = max(1, round(PAPER_TIER_FRACTIONS[0] * num_layers))
    n_long = max(1, round(PAPER_TIER_FRACTIONS[2] * num_layers))
    n_long = min(n_long, num_layers - n_sensory - 1)
    first_long = num_layers - n_long
    return {
        "sensory": (0, n_sensory - 1),
        "working": (n_sensory, first_long - 1),
        "long_term": (first_long, num_layers - 1),
    }


def split_budget(weights: list[float], per_layer: int) -> list[int]:
    """Layer-dependent budgets (METHOD.md section 6).

    ``m_l = floor(w_l / sum(w) * per_layer * L)``; the rounding remainder goes to the last
    layer, so the total is exactly ``per_layer * L``.
    """
    total = per_layer * len(weights)
    weight_sum = float(sum(weights))
    if weight_sum <= 0 or any(w < 0 for w in weights):
        raise ValueError("budget weights must be non-negative with a positive sum")
    budgets = [math.floor(w / weight_sum * total) for w in weights]
    budgets[-1] += total - sum(budgets)
    return budgets


def paper_default(
    model: ModelInfo,
    budget: int = 4000,
    reindex: str = "lazy",
    budget_weights: list[float] | None = None,
) -> Policy:
    """The paper's setting for any layer count (METHOD.md sections 3-5).

    Sensory layers: pure recency (w = 1, k = 20). Working layers: w falls linearly from
    w0 = 0.75 to w0 - g = 0.15 across the tier (the paper's formula) and k from 20 to 8
    (the official code's Qwen setting, whose w endpoints match the paper's). Long-term
    layers: pure attention (w = 0) with a summary token. Smoothing 0.1 / 0.3 / 0.4. With
    ``budget_weights`` (one per layer) the total ``budget * layers`` is split by weight
    (METHOD.md section 6).
    """
    tiers = paper_tiers(model.num_layers)
    if budget_weights is not None and len(budget_weights) != model.num_layers:
        raise PolicyError(f"{len(budget_weights)} budget weights for {model.num_layers} layers")
    budgets = split_budget(budget_weights, budget) if budget_weights else [budget] * model.num_layers
    w_start, w_end = tiers["working"]
    layers = []
    for index in range(model.num_layers):
        tier = next(name for name, (a, b) in tiers.items() if a <= index <= b)
        if tier == "sensory":
            w, k = 1.0, PAPER_FORGETTING_SHALLOW
        elif tier == "working":
            frac = 0.0 if w_end == w_start else (index - w_start) / (w_end - w_start)
            w = PAPER_W0 - PAPER_G * frac
            k = PAPER_FORGETTING_SHALLOW + (PAPER_FORGETTING_MIDDLE_END - PAPER_FORGETTING_SHALLOW) * frac
        else:
            w, k = 0.0, PAPER_FORGETTING_MIDDLE_END
        layers.append(
            LayerPolicy(
                index=index, tier=tier, recency_weight=round(w, 6), forgetting_rate=round(k, 6),
                smoothing=PAPER_SMOOTHING[tier], budget=budgets[index], summary_token=tier == "long_term",
            )
        )
    provenance = {
        "created_by": "hermes-probe 0.1.0",
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": "paper-default",
    }
    return Policy(model, budget, tiers, layers, Guidance(), reindex, provenance)


# -- validation ------------------------------------------------------------------------
# A guidance prompt is prefilled at every compression, so its length is its cost; the
# defaults are ~150 characters.
MAX_GUIDANCE_CHARS = 2000
MAX_HISTORY_PLACEHOLDERS = 4


def _check_template(text: str, key: str, source: str) -> None:
    """A guidance template is data: literal text plus bare ``{history}`` placeholders. Format specs (``{history:>9999}`` makes a prompt of any
    size), conversions (``{history!r}``) and other fields are refused, so that formatting
    it can neither fail mid-stream nor grow without bound."""
    try:
        fields = [(name, spec, conversion) for _, name, spec, conversion in string.Formatter().parse(text)
                  if name is not None]
    except ValueError as exc:  # a lone "{" or "}"
        raise PolicyError(f"{source}: guidance.{key} is not a valid template ({exc}); "
                          "write a literal brace as {{ or }}") from None
    for name, spec, conversion in fields:
        if name != "history" or spec or conversion:
            shown = "{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
            raise PolicyError(f"{source}: guidance.{key} contains {shown}; "
                              "the only placeholder allowed is a bare {history}")
    if not fields:
        raise PolicyError(f"{source}: guidance.{key} must contain the placeholder {{history}}")
    if len(fields) > MAX_HISTORY_PLACEHOLDERS:  # each one repeats the last question and answer
        raise PolicyError(f"{source}: guidance.{key} repeats {{history}} {len(fields)} times "
                          f"(at most {MAX_HISTORY_PLACEHOLDERS})")

def _need(data: dict, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(data, dict):
        raise PolicyError(f"{where} must be an object")
    if key not in data:
        raise PolicyError(f"{where} is missing {key!r}")
    value = data[key]
    if kind in (int, float) or kind == (int, float):
        if isinstance(value, bool) or not isinstance(value, kind):
            raise PolicyError(f"{where}.{key} must be a number, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise PolicyError(f"{where}.{key} must be finite, got {value!r}")
    elif not isinstance(value, kind):
        raise PolicyError(f"{where}.{key} has the wrong type: {type(value).__name__}")
    return value


def _parse(data: Any, source: str) -> Policy:
    if not isinstance(data, dict):
        raise PolicyError(f"{source}: a policy must be a JSON object")
    schema = data.get("schema")
    if schema != SCHEMA:
        raise PolicyError(f"{source}: schema is {schema!r}, expected {SCHEMA!r}")
    where = source
    m = _need(data, "model", dict, where)
    model = ModelInfo(
        name_or_path=_need(m, "name_or_path", str, f"{where}.model"),
        architecture=_need(m, "architecture", str, f"{where}.model"),
        num_layers=_need(m, "num_layers", int, f"{where}.model"),
        num_heads=_need(m, "num_heads", int, f"{where}.model"),
        num_kv_heads=_need(m, "num_kv_heads", int, f"{where}.model"),
        tokens_per_frame=_need(m, "tokens_per_frame", int, f"{where}.model"),
    )
    if model.num_layers < 3 or model.num_heads < 1 or model.num_kv_heads < 1 or model.tokens_per_frame < 1:
        raise PolicyError(f"{source}: model shape values must be positive (and at least 3 layers)")
    budget = _need(_need(data, "budget", dict, where), "video_tokens_per_layer", int, f"{where}.budget")
    if budget < model.tokens_per_frame:
        raise PolicyError(
            f"{source}: budget.video_tokens_per_layer={budget} is smaller than one frame "
            f"({model.tokens_per_frame} tokens)"
        )
    raw_tiers = _need(data, "tiers", dict, where)
    tiers: dict[str, tuple[int, int]] = {}
    expected_start = 0
    for name in TIERS:
        rng = _need(raw_tiers, name, list, f"{where}.tiers")
        if len(rng) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in rng):
            raise PolicyError(f"{source}: tiers.{name} must be [first, last] layer indices")
        first, last = rng
        if first != expected_start or last < first:
            raise PolicyError(
                f"{source}: tiers must be contiguous, ordered and cover every layer once "
                f"(tiers.{name} = {rng}, expected it to start at {expected_start})"
            )
        tiers[name] = (first, last)
        expected_start = last + 1
    if expected_start != model.num_layers:
        raise PolicyError(f"{source}: tiers cover {expected_start} layers, the model has {model.num_layers}")
    raw_layers = _need(data, "layers", list, where)
    if len(raw_layers) != model.num_layers:
        raise PolicyError(f"{source}: {len(raw_layers)} layer entries for a {model.num_layers}-layer model")
    layers = []
    for i, entry in enumerate(raw_layers):
        at = f"{where}.layers[{i}]"
        layer = LayerPolicy(
            index=_need(entry, "index", int, at),
            tier=_need(entry, "tier", str, at),
            recency_weight=float(_need(entry, "recency_weight", (int, float), at)),
            forgetting_rate=float(_need(entry, "forgetting_rate", (int, float), at)),
            smoothing=float(_need(entry, "smoothing", (int, float), at)),
            budget=_need(entry, "budget", int, at),
            summary_token=_need(entry, "summary_token", bool, at),
        )
        if layer.index != i:
            raise PolicyError(f"{at}.index is {layer.index}, expected {i}")
        if layer.tier not in TIERS:
            raise PolicyError(f"{at}.tier is {layer.tier!r}, expected one of {', '.join(TIERS)}")
        if not 0.0 <= layer.recency_weight <= 1.0:
            raise PolicyError(f"{at}.recency_weight must be in [0, 1], got {layer.recency_weight}")
        if layer.forgetting_rate < 0:
            raise PolicyError(f"{at}.forgetting_rate must be >= 0, got {layer.forgetting_rate}")
        if not 0.0 <= layer.smoothing < 1.0:
            raise PolicyError(f"{at}.smoothing must be in [0, 1), got {layer.smoothing}")
        if layer.budget < model.tokens_per_frame:
            raise PolicyError(
                f"{at}.budget={layer.budget} is smaller than one frame ({model.tokens_per_frame} tokens)"
            )
        layers.append(layer)
    g = _need(data, "guidance", dict, where)
    guidance = Guidance(
        local=_need(g, "local", str, f"{where}.guidance"),
        global_=_need(g, "global", str, f"{where}.guidance"),
        local_with_history=_need(g, "local_with_history", str, f"{where}.guidance"),
        global_with_history=_need(g, "global_with_history", str, f"{where}.guidance"),
    )
    for key, text in guidance.to_dict().items():
        if len(text) > MAX_GUIDANCE_CHARS:
            raise PolicyError(f"{source}: guidance.{key} is {len(text)} characters long "
                              f"(at most {MAX_GUIDANCE_CHARS})")
        if key.endswith("_with_history"):  # the others are used as they are, never formatted
            _check_template(text, key, source)
    reindex = _need(data, "reindex", str, where)
    if reindex not in REINDEX_MODES:
        raise PolicyError(f"{source}: reindex is {reindex!r}, expected 'lazy' or 'eager'")
    provenance = data.get("provenance", {})
    if not isinstance(provenance, dict):
        raise PolicyError(f"{source}: provenance must be an object")
    return Policy(model, budget, tiers, layers, guidance, reindex, provenance)
