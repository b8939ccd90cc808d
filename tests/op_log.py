"""Which aten ops a piece of code dispatches: proof that a step is fit for CUDA-graph capture."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# ``_local_scalar_dense`` (``item`` under inference mode) is what ``.item()``, ``int(t)`` and
# ``bool(t)`` dispatch to: a device-to-host sync; the others make shapes that depend on values.
# ``.tolist()`` dispatches nothing: the meta-device tests catch it.
HOST_READS = frozenset({"_local_scalar_dense", "item", "nonzero", "masked_select", "unique"})


class OpLog(TorchDispatchMode):
    """Records the name of every aten op dispatched inside the ``with`` block."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(
        self, func: torch._ops.OpOverload, types: object, args: tuple = (), kwargs: dict | None = None
    ) -> object:
        self.ops.append(func.__name__)
        return func(*args, **(kwargs or {}))

    def op_names(self) -> set[str]:
        """Op names without their overload (``add`` for ``add.Tensor``)."""
        return {op.split(".")[0] for op in self.ops}
