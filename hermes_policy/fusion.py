"""One function, two ways to run it: plain torch, or compiled into one kernel on CUDA.

:class:`FusedOp` wraps a function written in plain torch (the reference, and what runs on
the CPU). On CUDA it is compiled by ``torch.compile`` (Inductor generates one Triton kernel
per function), with rounding to the input dtype where the eager code rounds
(``emulate_precision_casts``). If compiling fails (no Triton, no compiler), the eager code
runs from then on, with a warning. Set ``HERMES_FUSED_OPS=0`` to run the eager code
everywhere.

Kept apart from the ops themselves (:mod:`hermes_policy.fused_ops`, and the attention
module's) so that any module can define one without importing the model code.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable

import torch

ENABLED = os.environ.get("HERMES_FUSED_OPS", "1") != "0"


class FusedOp:
    """A function run eagerly, or compiled into one kernel when its first argument is on CUDA."""

    def __init__(self, eager: Callable[..., object]):
        self.eager = eager
        self.name = eager.__name__.lstrip("_")
        self._compiled: Callable[..., object] | None = None
        self.failed = False

    def __call__(self, *args: object) -> object:
        first = args[0]
        if not ENABLED or self.failed or not isinstance(first, torch.Tensor) or first.device.type != "cuda":
            return self.eager(*args)
        if self._compiled is None:
            self._compiled = torch.compile(
                self.eager, dynamic=True, fullgraph=True, options={"emulate_precision_casts": True}
            )
        try:
            return self._compiled(*args)
        except Exception as error:  # no Triton or no C compiler: keep the eager kernels
            if torch.cuda.is_current_stream_capturing():
                raise
            self.failed = True
            warnings.warn(f"compiling {self.name} failed ({type(error).__name__}: {error}); running it eagerly", stacklevel=2)
            return self.eager(*args)
