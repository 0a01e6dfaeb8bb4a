"""Every switch that picks a speed path, in one object; and the one module that reads the environment.

:class:`RuntimeOptions` holds how a session answers (``answer_path``), whether it replays
its ingest forwards as CUDA graphs (``ingest_graphs``), and whether each Triton kernel and
the compiled element-wise ops run. Every combination gives the same results up to
rounding; the switches exist to measure one path against another and to step around a
broken GPU or Triton build.

Give options to the session::

    StreamingSession(adapter, rule, options=RuntimeOptions(answer_path="static", split_kv_kernel=False))

Two kinds of fields:

* per session: ``answer_path`` and ``ingest_graphs`` (None: the session decides, as
  documented on :class:`~hermes_policy.session.StreamingSession`);
* per process: the kernel switches, ``fused_ops`` and ``blocks_with_chunk``. The kernels
  are launched deep inside the model's attention, which has no session at hand, so they
  consult the process's active options (:func:`current`). A session applies its options
  when it is built (:func:`apply`): a second session with other kernel switches in the
  same process changes them for the first one too (from its next eager call; CUDA graphs
  already captured keep the kernels they were captured with).

Environment variables are overrides, read here only (:meth:`RuntimeOptions.from_env`):

==============================  ===========================  =========================
variable                        field                        values
==============================  ===========================  =========================
``HERMES_SPLIT_KV``             ``split_kv_kernel``          ``0`` off, ``1`` on
``HERMES_PROBABILITY_KERNEL``   ``probability_kernel``       ``0`` off, ``1`` on
``HERMES_BLOCK_KERNEL``         ``block_attention_kernel``   ``0`` off, ``1`` on
``HERMES_COMPACTION_KERNEL``    ``compaction_kernel``        ``0`` off, ``1`` on
``HERMES_SUMMARY_KERNEL``       ``summary_kernel``           ``0`` off, ``1`` on
``HERMES_FUSED_OPS``            ``fused_ops``                ``0`` off, ``1`` on
``HERMES_BLOCKS_WITH_CHUNK``    ``blocks_with_chunk``        ``1`` on, ``0`` off
==============================  ===========================  =========================

The other variables the library reads (where derived files live, the HTTP judge's
address, the distributed evaluation's timeout, torchrun's ranks, Triton's interpreter)
have their own small functions below.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from hermes_policy.errors import HermesError

AnswerPath = Literal["graphs", "static", "eager"]
ANSWER_PATHS: tuple[str, ...] = ("graphs", "static", "eager")

# field -> the environment variable that overrides it ("0" or "1")
ENVIRONMENT: dict[str, str] = {
    "split_kv_kernel": "HERMES_SPLIT_KV",
    "probability_kernel": "HERMES_PROBABILITY_KERNEL",
    "block_attention_kernel": "HERMES_BLOCK_KERNEL",
    "compaction_kernel": "HERMES_COMPACTION_KERNEL",
    "summary_kernel": "HERMES_SUMMARY_KERNEL",
    "fused_ops": "HERMES_FUSED_OPS",
    "blocks_with_chunk": "HERMES_BLOCKS_WITH_CHUNK",
}


class OptionsError(HermesError):
    """An option, or the environment variable that overrides it, has a value it cannot take."""


@dataclass(frozen=True)
class RuntimeOptions:
    """How the runtime runs; every choice gives the same results up to rounding.

    Parameters
    ----------
    answer_path : ``"graphs"``, ``"static"``, ``"eager"``, or None for the session's
        automatic choice (per session)
    ingest_graphs : replay recurring ingest forwards as CUDA graphs; None: where answers
        use graphs (per session)
    split_kv_kernel : the answers' split-key attention kernel
        (:mod:`~hermes_policy.kernels.split_kv_attention`); off: explicit masked attention
    probability_kernel : the pseudo-queries' weighted probability kernel
        (:mod:`~hermes_policy.kernels.probability_kernel`); off: score products
    block_attention_kernel : the pseudo-query blocks' attention kernel
        (:mod:`~hermes_policy.kernels.block_attention_kernel`); off: flash plus explicit products
    compaction_kernel : one launch gathers every layer's kept tokens
        (:mod:`~hermes_policy.kernels.compaction_kernel`); off: layer by layer
    summary_kernel : one launch computes every layer's summary token
        (:mod:`~hermes_policy.kernels.summary_kernel`); off: layer by layer
    fused_ops : compile the element-wise steps on CUDA
        (:mod:`~hermes_policy.kernels.fusion`); off: the eager torch code
    blocks_with_chunk : the pseudo-query blocks' rows join the chunk's cuDNN call over the
        cache (off by default)

    The last seven are process-wide (see the module's docstring).
    """

    answer_path: AnswerPath | None = None
    ingest_graphs: bool | None = None
    split_kv_kernel: bool = True
    probability_kernel: bool = True
    block_attention_kernel: bool = True
    compaction_kernel: bool = True
    summary_kernel: bool = True
    fused_ops: bool = True
    blocks_with_chunk: bool = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **settings: object) -> RuntimeOptions:
        """``RuntimeOptions(**settings)`` with the environment's variables overriding it.

        ``environ`` defaults to ``os.environ``. A variable set to ``0`` turns its switch
        off and ``1`` on; unset or empty leaves it; any other value is an
        :class:`OptionsError` that names the variable.
        """
        environ = os.environ if environ is None else environ
        overrides: dict[str, bool] = {}
        for field, variable in ENVIRONMENT.items():
            value = environ.get(variable, "").strip()
            if value == "":
                continue
            if value not in ("0", "1"):
                raise OptionsError(f"${variable} must be 0 (off) or 1 (on), got {value!r}")
            overrides[field] = value == "1"
        return cls(**{**settings, **overrides})  # type: ignore[arg-type]


_active: RuntimeOptions | None = None


def current() -> RuntimeOptions:
    """The process's active options: the last :func:`apply`'d, else the environment's
    (read once, at the first call)."""
    global _active
    if _active is None:
        _active = RuntimeOptions.from_env()
    return _active


def apply(options: RuntimeOptions) -> RuntimeOptions:
    """Make ``options`` the process's active options; returns the ones they replace."""
    global _active
    if not isinstance(options, RuntimeOptions):
        raise OptionsError(f"options must be RuntimeOptions, got {type(options).__name__}")
    previous = current()
    _active = options
    return previous


@contextmanager
def applied(options: RuntimeOptions | None = None, **changes: object) -> Iterator[RuntimeOptions]:
    """Within the block, ``options`` (default: the active ones) with ``changes`` are active;
    the previous options come back after it. For tests and benchmarks that compare paths."""
    chosen = replace(options if options is not None else current(), **changes)  # type: ignore[arg-type]
    previous = apply(chosen)
    try:
        yield chosen
    finally:
        apply(previous)


# -- the library's other environment variables ----------------------------------------------
def variable(name: str) -> str | None:
    """The environment variable ``name`` (None when unset): for the variables other tools
    own (torchrun's ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``; an API key's variable)."""
    return os.environ.get(name)


def cache_root() -> Path:
    """Where derived files live: ``$HERMES_PROBE_CACHE``, else ``~/.cache/hermes-probe``."""
    return Path(os.environ.get("HERMES_PROBE_CACHE") or Path.home() / ".cache" / "hermes-probe")


def derived_cache_enabled() -> bool:
    """Whether derived files (the embedded model's float copy) are written and reused:
    not when ``HERMES_PROBE_NO_CACHE=1``."""
    return os.environ.get("HERMES_PROBE_NO_CACHE") != "1"


def judge_endpoint() -> tuple[str | None, str | None]:
    """The HTTP judge's default ``(url, model)``: ``$HERMES_JUDGE_URL``, ``$HERMES_JUDGE_MODEL``."""
    return os.environ.get("HERMES_JUDGE_URL") or None, os.environ.get("HERMES_JUDGE_MODEL") or None


JUDGE_ENDPOINT_VARIABLES = "HERMES_JUDGE_URL and HERMES_JUDGE_MODEL"


def distributed_timeout_s(default: float) -> float:
    """Seconds a rank waits in a collective: ``$HERMES_EVAL_DIST_TIMEOUT_S``, else ``default``."""
    value = os.environ.get("HERMES_EVAL_DIST_TIMEOUT_S", "").strip()
    if not value:
        return default
    try:
        seconds = float(value)
    except ValueError:
        raise OptionsError(f"$HERMES_EVAL_DIST_TIMEOUT_S must be a number of seconds, got {value!r}") from None
    if not seconds > 0:
        raise OptionsError(f"$HERMES_EVAL_DIST_TIMEOUT_S must be positive, got {value!r}")
    return seconds


def triton_interpreted() -> bool:
    """Whether Triton runs its kernels in its interpreter (``TRITON_INTERPRET=1``, which
    must be set before Triton is imported): then the kernels also run on the CPU."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
