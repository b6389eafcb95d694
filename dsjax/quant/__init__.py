"""FP4 weight formats (NVFP4, MXFP4) and the DeepSeek FP8 block format the converter reads.

Owns number formats only: encoding, packing, scales, the `QTensor` container and reference dequantize/matmul.
It knows nothing about files, tensor names or placement (dsjax/store, dsjax/runtime) and holds no kernels
(kernels/ imports these references as its oracle).

    fp4.py        E2M1 element codes, rounding, nibble packing
    nvfp4.py      NVFP4 scales: E4M3 per 16 elements + FP32 per matrix
    mxfp4.py      MXFP4 scales: E8M0 per 32 elements
    qtensor.py    QTensor, quantize / dequantize / qlinear_reference, ModelOpt and gpt-oss importers
    fp8_block.py  DeepSeek FP8 128x128 block dequant (and quant, for tests)
"""

from dsjax.quant.fp4 import (
    E2M1_VALUES,
    e2m1_decode,
    e2m1_decode_jax,
    e2m1_encode,
    pack_nibbles,
    unpack_nibbles,
    unpack_nibbles_jax,
)
from dsjax.quant.fp8_block import dequantize_fp8_block, quantize_fp8_block
from dsjax.quant.qtensor import (
    BLOCK_SIZES,
    QTensor,
    dequantize,
    dequantize_np,
    from_gpt_oss_mxfp4,
    from_modelopt_nvfp4,
    qlinear_reference,
    quantize,
)

__all__ = [
    "BLOCK_SIZES",
    "E2M1_VALUES",
    "QTensor",
    "dequantize",
    "dequantize_fp8_block",
    "dequantize_np",
    "e2m1_decode",
    "e2m1_decode_jax",
    "e2m1_encode",
    "from_gpt_oss_mxfp4",
    "from_modelopt_nvfp4",
    "pack_nibbles",
    "qlinear_reference",
    "quantize",
    "quantize_fp8_block",
    "unpack_nibbles",
    "unpack_nibbles_jax",
]
