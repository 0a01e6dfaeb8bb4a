"""The policy JSON (schemas ``hermes-policy/1`` and ``/2``): the only interface from probe to runtime.

A policy is data, never code. It is validated field by field when loaded and before it is
written, and checked against the model it is used with. :func:`~hermes_policy.policy.paper.paper_default` builds
the paper's 10/60/30 setting for any layer count (METHOD.md sections 3-5).

Schema 2 (``hermes-probe analyze --per-head``) is schema 1 plus a ``heads`` list in every
layer entry, one item per KV head (docs/heads.md): its role, its memory (a fixed window for
a streaming head, a share of what the layer's windows leave for the others), its recency
weight and forgetting rate. A layer's memory stays ``num_kv_heads x budget`` token slots,
as in schema 1; the layer's own fields remain a complete per-layer policy.
"""

from __future__ import annotations

import json
import math
import string
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from hermes_policy.errors import PolicyError
from hermes_policy.fileio.atomic import write_json_atomic
from hermes_policy.fileio.json_input import load_json_file

SCHEMA = "hermes-policy/1"
SCHEMA_V2 = "hermes-policy/2"
SCHEMAS = (SCHEMA, SCHEMA_V2)
TIERS = ("sensory", "working", "long_term")
REINDEX_MODES = ("lazy", "eager")
# Head roles (docs/heads.md): a streaming head keeps a window of the newest tokens; retrieval
# and anchor heads keep a share of the layer's memory, scored like a layer (w, k).
HEAD_ROLES = ("streaming", "retrieval", "anchor")
SHARE_TOLERANCE = 1e-3  # shares are written rounded; their sum may miss 1 by that much

GUIDANCE_LOCAL = (
    "Describe the current scene in detail, focusing on specific objects, fine-grained actions, "
    "and spatial relationships."
)
GUIDANCE_GLOBAL = (
    "Summarize the video narrative, identifying main characters, key events, timeline changes, "
    "and the overall theme."
)

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
class HeadPolicy:
    """Retention parameters of one KV head (schema 2).

    role : one of :data:`HEAD_ROLES`
    window : tokens of a streaming head's window of the newest stream tokens (None otherwise)
    share : a retrieval or anchor head's share of the layer's memory left after the
        streaming windows (None for a streaming head); the shares of a layer sum to 1
    recency_weight, forgetting_rate : as for a layer (a streaming head: 1 and its measured k)
    confidence : how clearly the probe saw the role, in [0, 1] (informative; None if unknown)
    """

    role: str
    window: int | None
    share: float | None
    recency_weight: float
    forgetting_rate: float
    confidence: float | None = None


@dataclass(frozen=True)
class LayerPolicy:
    """Retention parameters of one layer.

    recency_weight : w_l, 1 = pure recency score, 0 = pure attention score
    forgetting_rate : k in ``exp(-k * dt / (T - 1))``
    smoothing : lambda_l of cross-layer smoothing (deep to shallow)
    budget : stream tokens this layer keeps (per KV head: the layer's memory is
        ``num_kv_heads x budget`` token slots, however its heads share them)
    summary_token : fold evicted tokens into one summary token (long-term layers)
    heads : schema 2 only: one :class:`HeadPolicy` per KV head
    """

    index: int
    tier: str
    recency_weight: float
    forgetting_rate: float
    smoothing: float
    budget: int
    summary_token: bool
    heads: tuple[HeadPolicy, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The JSON entry; ``heads`` only when the layer has them (schema 1 is unchanged)."""
        data = asdict(self)
        if self.heads is None:
            del data["heads"]
        else:
            data["heads"] = [{k: v for k, v in asdict(h).items() if not (k == "confidence" and v is None)}
                             for h in self.heads]
        return data


def head_token_budgets(layer: LayerPolicy, num_kv_heads: int) -> list[int]:
    """Stream tokens each KV head of ``layer`` keeps: ``(num_kv_heads,)`` ints.

    Schema 1 (no heads): every head keeps the layer's budget. Schema 2: a streaming head
    keeps its window; the others split what is left of ``num_kv_heads x budget`` by their
    shares (rounded down, the remainder to the last of them), so the layer's total never
    exceeds the schema-1 memory at the same budget.
    """
    if layer.heads is None:
        return [layer.budget] * num_kv_heads
    total = num_kv_heads * layer.budget
    windows = [h.window if h.role == "streaming" else None for h in layer.heads]
    left = total - sum(w for w in windows if w is not None)
    shared = [i for i, w in enumerate(windows) if w is None]
    tokens = [w if w is not None else math.floor((layer.heads[i].share or 0.0) * left)
              for i, w in enumerate(windows)]
    if shared:
        tokens[shared[-1]] += left - sum(tokens[i] for i in shared)
    return tokens


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
    """A validated ``hermes-policy/1`` or ``/2`` document (``/2`` when its layers have heads)."""

    model: ModelInfo
    budget: int
    tiers: dict[str, tuple[int, int]]
    layers: list[LayerPolicy]
    guidance: Guidance = field(default_factory=Guidance)
    reindex: str = "lazy"
    provenance: dict[str, Any] = field(default_factory=dict)

    # -- (de)serialisation -----------------------------------------------------------
    @property
    def per_head(self) -> bool:
        """Whether the layers carry per-KV-head entries (schema 2)."""
        return any(layer.heads is not None for layer in self.layers)

    @property
    def schema(self) -> str:
        return SCHEMA_V2 if self.per_head else SCHEMA

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": self.schema,
            "model": asdict(self.model),
            "budget": {"video_tokens_per_layer": self.budget},
            "tiers": {name: list(self.tiers[name]) for name in TIERS},
            "layers": [layer.to_dict() for layer in self.layers],
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
        layers = [_scaled_layer(layer, scale, self.model.tokens_per_frame, self.model.num_kv_heads)
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


def _scaled_layer(layer: LayerPolicy, scale: float, tokens_per_frame: int, num_kv_heads: int) -> LayerPolicy:
    """``layer`` with its budget (and streaming windows, in proportion) scaled by ``scale``.

    Windows are rounded down (at least one token) and, should rounding leave them above the
    layer's memory, trimmed from the largest, so the scaled layer stays valid."""
    budget = max(tokens_per_frame, round(layer.budget * scale))
    if layer.heads is None:
        return replace(layer, budget=budget)
    heads = [replace(h, window=max(1, math.floor(h.window * scale))) if h.window is not None else h
             for h in layer.heads]
    shared = sum(1 for h in heads if h.window is None)
    room = num_kv_heads * budget - shared  # each share head keeps at least a token
    while sum(h.window or 0 for h in heads) > room:
        i = max(range(len(heads)), key=lambda j: heads[j].window or 0)
        heads[i] = replace(heads[i], window=heads[i].window - 1)
    return replace(layer, budget=budget, heads=tuple(heads))


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
    if schema not in SCHEMAS:
        raise PolicyError(f"{source}: schema is {schema!r}, expected {SCHEMA!r} or {SCHEMA_V2!r}")
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
    if schema == SCHEMA_V2 and model.num_heads % model.num_kv_heads:
        # per-head entries are per KV head; each stands for a whole group of query heads
        raise PolicyError(f"{source}: model.num_heads={model.num_heads} query heads do not group onto "
                          f"model.num_kv_heads={model.num_kv_heads} KV heads")
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
        if schema == SCHEMA_V2:
            layer = replace(layer, heads=_parse_heads(entry, layer, model, at))
        elif isinstance(entry, dict) and "heads" in entry:
            raise PolicyError(f"{at} has 'heads', which needs schema {SCHEMA_V2!r} (the file says {SCHEMA!r})")
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


def _parse_heads(entry: dict, layer: LayerPolicy, model: ModelInfo, at: str) -> tuple[HeadPolicy, ...]:
    """The ``heads`` list of one schema-2 layer entry, validated (see :class:`HeadPolicy`)."""
    if "heads" not in entry:
        raise PolicyError(f"{at} is missing 'heads' (schema {SCHEMA_V2!r} has one entry per KV head in "
                          "every layer)")
    raw = _need(entry, "heads", list, at)
    if len(raw) != model.num_kv_heads:
        raise PolicyError(f"{at}.heads has {len(raw)} entries, the model has {model.num_kv_heads} KV heads "
                          f"(one entry per KV head; {model.num_heads} query heads in groups of "
                          f"{model.num_heads // model.num_kv_heads})")
    heads = []
    for j, item in enumerate(raw):
        where = f"{at}.heads[{j}]"
        role = _need(item, "role", str, where)
        if role not in HEAD_ROLES:
            raise PolicyError(f"{where}.role is {role!r}, expected one of {', '.join(HEAD_ROLES)}")
        window, share = item.get("window"), item.get("share")
        if role == "streaming":
            if isinstance(window, bool) or not isinstance(window, int) or window < 1:
                raise PolicyError(f"{where}: a streaming head needs a positive integer window, got {window!r}")
            if share is not None:
                raise PolicyError(f"{where}: a streaming head has a window, not a share (got share={share!r})")
        else:
            if window is not None:
                raise PolicyError(f"{where}: a {role} head has a share, not a window (got window={window!r})")
            share = float(_need(item, "share", (int, float), where))
            if not 0.0 < share <= 1.0:
                raise PolicyError(f"{where}.share must be in (0, 1], got {share}")
        head = HeadPolicy(
            role=role, window=window, share=share,
            recency_weight=float(_need(item, "recency_weight", (int, float), where)),
            forgetting_rate=float(_need(item, "forgetting_rate", (int, float), where)),
            confidence=None if item.get("confidence") is None
            else float(_need(item, "confidence", (int, float), where)),
        )
        if not 0.0 <= head.recency_weight <= 1.0:
            raise PolicyError(f"{where}.recency_weight must be in [0, 1], got {head.recency_weight}")
        if head.forgetting_rate < 0:
            raise PolicyError(f"{where}.forgetting_rate must be >= 0, got {head.forgetting_rate}")
        if head.confidence is not None and not 0.0 <= head.confidence <= 1.0:
            raise PolicyError(f"{where}.confidence must be in [0, 1], got {head.confidence}")
        heads.append(head)
    shares = [h.share for h in heads if h.share is not None]
    if shares and abs(sum(shares) - 1.0) > SHARE_TOLERANCE:
        raise PolicyError(f"{at}.heads: the shares of the retrieval and anchor heads sum to {sum(shares):.4g}, "
                          "not 1")
    windows = sum(h.window for h in heads if h.window is not None)
    memory = model.num_kv_heads * layer.budget
    if windows + len(shares) > memory:  # every share head must keep at least one token
        raise PolicyError(f"{at}.heads: the streaming windows take {windows} of the layer's {memory} token slots "
                          f"({model.num_kv_heads} KV heads x budget {layer.budget}), leaving too little for "
                          f"{len(shares)} other head(s)")
    tokens = head_token_budgets(replace(layer, heads=tuple(heads)), model.num_kv_heads)
    starved = [j for j, t in enumerate(tokens) if t < 1]
    if starved:
        raise PolicyError(f"{at}.heads[{starved[0]}] would keep no token (its share of "
                          f"{memory - windows} slots rounds to 0)")
    return tuple(heads)
