"""GGUF quantised tensors -> QuantLinear's packed layouts, without dequantising: the file's integers are kept as
they are (Q4_K's are reordered into 32-element blocks), and so are its fp16 scales (Q4_K's sub-block scales,
products of an fp16 and a 6-bit integer, become float32, exactly).

Block formats (ggml's, 32 or 256 elements along a row):
  Q8_0 (34 bytes / 32): fp16 d, 32 int8 q;                    value = d * q
  Q4_0 (18 bytes / 32): fp16 d, 16 bytes of nibbles;         value = d * (q - 8)
  Q4_1 (20 bytes / 32): fp16 d, fp16 m, 16 bytes of nibbles; value = d * q + m
  Q4_K (144 bytes / 256): fp16 d, fp16 dmin, 12 bytes of 6-bit scales and mins for 8 sub-blocks of 32, 128 bytes of
       nibbles (each 64 elements: 32 bytes, low nibbles the first 32, high nibbles the next 32);
       value = d * sc_j * q - dmin * m_j.
The nibble order of Q4_0/Q4_1 (byte i: element i low, element i + 16 high) is the q4 layout's, so their bytes are
copied; Q4_K's are regrouped.
"""

import numpy as np
import torch
from gguf import GGMLQuantizationType

from lmforge.layers.quant_linear import pack_nibbles

Q = GGMLQuantizationType
SERVED_TYPES = (Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q4_K)


def _f16(raw: np.ndarray) -> torch.Tensor:
    """Little-endian fp16 bytes [..., 2] -> float16 [...]."""
    return torch.from_numpy(np.ascontiguousarray(raw).view(np.float16)[..., 0].copy())


def packed_blocks(data: np.ndarray, qtype: Q) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A GGUF tensor's bytes [rows, bytes per row] -> (qweight, scales, mins or None) in QuantLinear's layout."""
    rows = data.shape[0]
    if qtype == Q.Q8_0:
        b = data.reshape(rows, -1, 34)
        q = torch.from_numpy(np.ascontiguousarray(b[..., 2:]).view(np.int8).reshape(rows, -1))
        return q, _f16(b[..., :2]), None
    if qtype in (Q.Q4_0, Q.Q4_1):
        size = 18 if qtype == Q.Q4_0 else 20
        b = data.reshape(rows, -1, size)
        d = _f16(b[..., :2])
        if qtype == Q.Q4_1:
            return torch.from_numpy(np.ascontiguousarray(b[..., 4:]).reshape(rows, -1)), d, _f16(b[..., 2:4])
        # Q4_0: min = -8 d, exact (then d q - 8 d = d (q - 8) exactly) in float16 unless it overflows
        m = -8 * d.float()
        if torch.equal(m.half().float(), m):
            m = m.half()
        else:
            d = d.float()
        return torch.from_numpy(np.ascontiguousarray(b[..., size - 16:]).reshape(rows, -1)), d, m
    if qtype == Q.Q4_K:
        return _q4_k(data.reshape(rows, -1, 144))
    raise ValueError(f"GGML type {qtype.name} is not served quantised")


def _q4_k(b: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rows, supers = b.shape[:2]
    d, dmin = _f16(b[..., 0:2]).float(), _f16(b[..., 2:4]).float()
    s = torch.from_numpy(np.ascontiguousarray(b[..., 4:16]).astype(np.int32))  # [rows, supers, 12]
    # ggml's 6-bit packing: sub-blocks 0-3 in the low 6 bits of bytes 0-3 (scales) and 4-7 (mins); 4-7 split
    # between the low/high nibbles of bytes 8-11 and the top 2 bits of bytes 0-3 / 4-7.
    sc = torch.cat([s[..., 0:4] & 63, (s[..., 8:12] & 15) | ((s[..., 0:4] >> 6) << 4)], dim=-1)
    mn = torch.cat([s[..., 4:8] & 63, (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)], dim=-1)
    scales = (d.unsqueeze(-1) * sc.float()).reshape(rows, supers * 8)
    mins = -(dmin.unsqueeze(-1) * mn.float()).reshape(rows, supers * 8)
    qs = torch.from_numpy(np.ascontiguousarray(b[..., 16:])).view(rows, supers, 4, 32)
    q = torch.stack([qs & 0x0F, qs >> 4], dim=3)  # [rows, supers, 4 chunks, low/high, 32]: element order
    return pack_nibbles(q.reshape(rows, supers * 256)), scales, mins
