"""Where one of our Triton kernels runs, and what happens when it cannot.

Each kernel (:mod:`~hermes_policy.kernels.split_kv_attention`,
:mod:`~hermes_policy.kernels.probability_kernel`, :mod:`~hermes_policy.kernels.block_attention_kernel`,
:mod:`~hermes_policy.kernels.compaction_kernel`, :mod:`~hermes_policy.kernels.summary_kernel`) has a
:class:`KernelSwitch`: a field of the process's active
:class:`~hermes_policy.options.RuntimeOptions` that turns it off (the environment overrides
it, see :mod:`hermes_policy.options`), and a flag set by a first launch that fails outside
a CUDA graph capture (a GPU or Triton build without the kernel), after which its caller's
plain torch path runs for the rest of the process.
On the CPU the kernels run only under Triton's interpreter (``TRITON_INTERPRET=1``, set
before Triton is imported; the tests do that in a subprocess).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from hermes_policy import options
from hermes_policy.kernels.fusion import capturing

try:
    import triton
except ImportError:  # pragma: no cover - torch ships Triton on Linux
    triton = None

INTERPRETED = options.triton_interpreted()


@dataclass
class KernelSwitch:
    """On/off state of one kernel.

    Parameters
    ----------
    option : the :class:`~hermes_policy.options.RuntimeOptions` field that turns it on or off
    name : the kernel, as a warning names it
    fallback : what runs instead, as a warning says it
    """

    option: str
    name: str
    fallback: str
    failed: bool = False  # set, with a warning, when a launch fails outside a graph capture

    def __post_init__(self) -> None:
        if not hasattr(options.RuntimeOptions, self.option):
            raise ValueError(f"RuntimeOptions has no field {self.option!r}")

    def enabled(self) -> bool:
        """Triton importable, no launch failed, and on in the process's active options."""
        return triton is not None and not self.failed and getattr(options.current(), self.option)

    def available(self, device: torch.device, head_dim: int) -> bool:
        """Enabled, on CUDA (or the CPU under Triton's interpreter), for a head size that is
        a power of two of at least 16 (the matrix units' tile)."""
        if not self.enabled() or (device.type != "cuda" and not INTERPRETED):
            return False
        return head_dim >= 16 and head_dim & (head_dim - 1) == 0

    def launch(self, kernel: Callable[..., torch.Tensor], *args: object) -> torch.Tensor | None:
        """``kernel(*args)``, or None when it fails: the first failure turns the kernel off
        for the process (with a warning), so the caller's plain path runs instead. Inside a
        CUDA graph capture a failure is raised (the capture fails and its caller falls back)."""
        try:
            return kernel(*args)
        except Exception as error:
            if capturing():
                raise
            self.failed = True
            warnings.warn(f"the {self.name} failed ({error}); {self.fallback}", stacklevel=3)
            return None
