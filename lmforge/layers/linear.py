import logging

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.kernels import usable

log = logging.getLogger("lmforge")
SMALL_ROWS = 3  # up to this many bf16 rows, streaming the weight once beats oneDNN (benchmarks/kernels.py)
_onednn: dict[str, bool] = {}


class Linear(nn.Module):
    """nn.Linear's parameters (`weight` [out, in], `bias`) and math. Inference on CPU in bf16 takes a fast path:
    decode-sized inputs the streaming kernel of lmforge/kernels, larger ones oneDNN with a pre-packed copy of the
    weight (rebuilt whenever the weight changes; it doubles this layer's weight memory). Training: F.linear."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)  # nn.Linear's default, for models built without weights
        if self.bias is not None:
            nn.init.uniform_(self.bias, -(in_features**-0.5), in_features**-0.5)
        self._packed: tuple[tuple[int, int], torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if x.dim() == 2 and x.dtype == torch.bfloat16 == w.dtype and (ops := usable(x, w)) is not None:
            if x.shape[0] <= SMALL_ROWS:
                return ops.linear_small(x.contiguous(), w, self.bias)
            if (packed := self._packed_weight()) is not None:
                return torch.ops.mkldnn._linear_pointwise(x, packed, self.bias, "none", [], "")
        return F.linear(x, w, self.bias)

    def _packed_weight(self) -> torch.Tensor | None:
        """oneDNN's blocked layout of the weight, so that its GEMM (AMX / AVX512-BF16) skips a reorder per call."""
        if self.weight.is_inference():  # made under inference_mode: no version counter to notice updates by
            return None
        key = (self.weight.data_ptr(), self.weight._version)  # any in-place update (optimizer, weight sync) bumps it
        if self._packed is None or self._packed[0] != key:
            if not _onednn_packing():
                return None
            self._packed = (key, torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), None))
        return self._packed[1]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def _onednn_packing() -> bool:
    """Whether this torch build packs bf16 weights for oneDNN; checked once (a failed probe is logged)."""
    if "ok" not in _onednn:
        try:
            w = torch.ones(8, 8, dtype=torch.bfloat16)
            out = torch.ops.mkldnn._linear_pointwise(w, torch.ops.mkldnn._reorder_linear_weight(w, None), None,
                                                     "none", [], "")
            _onednn["ok"] = bool(torch.equal(out, torch.full((8, 8), 8.0, dtype=torch.bfloat16)))
        except (RuntimeError, AttributeError) as e:
            log.info("oneDNN weight packing unavailable (%s); bf16 linears use F.linear", e)
            _onednn["ok"] = False
    return _onednn["ok"]
