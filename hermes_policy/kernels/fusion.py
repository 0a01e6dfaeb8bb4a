"""One function, two ways to run it: plain torch, or compiled into one kernel on CUDA.

:class:`FusedOp` wraps a function written in plain torch (the reference, and what runs on
the CPU). On CUDA it is compiled by ``torch.compile`` (Inductor generates one Triton kernel
per function), with rounding to the input dtype where the eager code rounds
(``emulate_precision_casts``). If compiling fails (no Triton, no compiler), the eager code
runs from then on, with a warning. ``RuntimeOptions.fused_ops=False``
(or ``HERMES_FUSED_OPS=0``, see :mod:`hermes_policy.options`) runs the eager code everywhere.

Kept apart from the ops themselves (:mod:`hermes_policy.kernels.fused_ops`, and the attention
module's) so that any module can define one without importing the model code.
"""

from __future__ import annotations

import functools
import types
import warnings
from collections.abc import Callable

import torch
from torch._dynamo.exc import FailOnRecompileLimitHit

from hermes_policy import options

MAX_COPIES = 4  # compiled copies one signature may start, each up to torch.compile's recompile limit


def own_code_copy(function: Callable[..., object]) -> Callable[..., object]:
    """``function`` with a code object of its own.

    ``torch.compile`` keeps its compiled variants per code object and stops compiling
    after a fixed number of them (``recompile_limit``, 8): a process that runs an op in
    float32 and bfloat16, at several ranks, would reach it and fall back to eager code.
    Each copy has its own cache and its own count.
    """
    copy = types.FunctionType(
        function.__code__.replace(), function.__globals__, function.__name__, function.__defaults__, function.__closure__
    )
    copy.__kwdefaults__ = function.__kwdefaults__
    return functools.update_wrapper(copy, function)


def tensor_signature(args: tuple[object, ...]) -> tuple[tuple[torch.dtype, int], ...]:
    """(dtype, rank) of each tensor argument: what one compiled copy never spans."""
    return tuple((a.dtype, a.dim()) for a in args if isinstance(a, torch.Tensor))


def capturing() -> bool:
    """Whether the current CUDA stream records a graph (a failure there must surface)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


class FusedOp:
    """A function run eagerly, or compiled into one kernel when its first argument is on CUDA.

    One compiled copy per :func:`tensor_signature` (see :func:`own_code_copy`). Sizes are
    specialised at the first call, and only the sizes seen to change become symbolic at
    the next compilation (``torch.compile``'s automatic dynamic shapes): the token count
    varies between calls, the feature sizes (hidden, heads, head size) do not. Compiled
    with every size symbolic (``dynamic=True``), Triton cannot prove the rows' 16-byte
    alignment and loads element by element, several times slower than the kernel's memory
    traffic needs (measurements: docs/performance.md).

    A copy that reaches torch.compile's recompile limit (inputs sliced at many lengths, each
    with its own strides) keeps its variants, and the next new variant starts a fresh copy
    (:data:`MAX_COPIES` per signature) instead of turning the op eager for the process.
    """

    def __init__(self, eager: Callable[..., object]):
        self.eager = eager
        self.name = eager.__name__.lstrip("_")
        self._compiled: dict[tuple, Callable[..., object]] = {}
        self._copies: dict[tuple, int] = {}  # compiled copies started per signature
        self._eager_signatures: set[tuple] = set()  # signatures past MAX_COPIES
        self.failed = False

    @property
    def compiled_signatures(self) -> tuple[tuple, ...]:
        """The tensor signatures compiled so far (empty: only eager runs)."""
        return tuple(s for s in self._compiled if s not in self._eager_signatures)

    def compiles(self, first: object) -> bool:
        """Whether a call whose first argument is ``first`` runs compiled code."""
        return options.current().fused_ops and not self.failed and isinstance(first, torch.Tensor) and first.device.type == "cuda"

    def _start_copy(self, signature: tuple) -> Callable[..., object]:
        self._copies[signature] = self._copies.get(signature, 0) + 1
        compiled = self._compiled[signature] = torch.compile(
            own_code_copy(self.eager), dynamic=None, fullgraph=True, options={"emulate_precision_casts": True}
        )
        return compiled

    def _eager_from_now_on(self, signature: tuple, args: tuple[object, ...]) -> object:
        self._eager_signatures.add(signature)
        warnings.warn(
            f"{self.name} reached torch.compile's recompile limit {self._copies[signature]} times for "
            f"{signature}; those calls run eagerly from now on",
            stacklevel=3,
        )
        return self.eager(*args)

    def __call__(self, *args: object) -> object:
        if not self.compiles(args[0]):
            return self.eager(*args)
        signature = tensor_signature(args)
        if signature in self._eager_signatures:
            return self.eager(*args)
        compiled = self._compiled.get(signature) or self._start_copy(signature)
        try:
            try:
                return compiled(*args)
            except FailOnRecompileLimitHit:
                # this copy holds its limit of variants (sizes, strides of sliced inputs);
                # they stay compiled for the calls that match them, but a new one would
                # turn the whole op eager: a fresh copy compiles it instead, up to a bound
                if capturing():
                    raise
                if self._copies[signature] >= MAX_COPIES:
                    return self._eager_from_now_on(signature, args)
                return self._start_copy(signature)(*args)
        except FailOnRecompileLimitHit:  # raised while capturing, or by a fresh copy
            if capturing():
                raise
            return self._eager_from_now_on(signature, args)
        except Exception as error:  # no Triton or no C compiler: keep the eager kernels
            if capturing():
                raise
            self.failed = True
            warnings.warn(f"compiling {self.name} failed ({type(error).__name__}: {error}); running it eagerly", stacklevel=2)
            return self.eager(*args)
