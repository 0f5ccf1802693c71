r"""Multiresolution hash encoding (Instant-NGP) with tiny-cuda-nn's exact semantics.

Two backends compute the same function from the same flat parameter vector ``params``, so a
checkpoint trained on a GPU with tinycudann renders on a CPU with PyTorch, and back
(docs/design.md, section 3; source: tiny-cuda-nn ``encodings/grid.h`` and ``common_device.h``).
Per level ``l`` and input ``x`` in [0, 1]^3:

.. math::

    s_l = 2^{l \log_2 b} \cdot R - 1 \ \text{(float32)}, \quad
    r_l = \lceil s_l \rceil + 1, \quad
    p = s_l x + 0.5 \ \text{(one rounding, like fmaf)}, \quad
    c = \lfloor p \rfloor, \quad f = p - c

The 8 corners ``c + (i, j, k)`` are looked up in the level's table and blended with trilinear
weights. A level's table holds ``T_l = min(next_multiple_of_8(r_l^3), 2^log2_hashmap_size)``
entries of ``F`` features; it is indexed densely (``x + y r + z r^2``, uint32) when
``r_l <= 1625`` and ``r_l^3 <= T_l``, otherwise by the hash
``x * 1 ^ y * 2654435761 ^ z * 805459861`` (uint32); both then ``% T_l``. Note that a corner
may sit at coordinate ``r_l`` (points near the +x/+y/+z faces): the dense index then wraps into
the next row, exactly as tcnn's does. Tables are stored one after another: parameter address
``(level_offset + index) * F + feature``; output column ``level * F + feature``.

Inputs outside [0, 1] are clamped to the unit cube (NaN becomes 0): tcnn would wrap them in
uint32 arithmetic, which no caller wants (the field gives zero density outside its box).

Modules: :mod:`.layout` (the per-level arithmetic tcnn does on the host),
:mod:`.torch_backend` (the PyTorch kernels and their autograd Function) and :mod:`.hash_grid`
(the ``nn.Module``: backend choice and dispatch).
"""

from .hash_grid import Backend, HashGridEncoding, tcnn_available
from .layout import HASH_PRIMES, MAX_DENSE_RESOLUTION, HashGridLayout, hash_grid_layout, level_scales

__all__ = [
    "HASH_PRIMES",
    "MAX_DENSE_RESOLUTION",
    "Backend",
    "HashGridEncoding",
    "HashGridLayout",
    "hash_grid_layout",
    "level_scales",
    "tcnn_available",
]
