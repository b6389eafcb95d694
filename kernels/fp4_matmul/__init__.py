"""Dense FP4 (NVFP4 / MXFP4) matmul: the fused Pallas kernel and its pure-jnp reference, same signature."""

from dsjax_kernels.fp4_matmul.decode import decode_tile, nibbles_to_f16_bits, scale_bits_to_f32
from dsjax_kernels.fp4_matmul.kernel import Fp4MatmulConfig, default_config, fp4_matmul
from dsjax_kernels.fp4_matmul.reference import dequantize_reference, fp4_matmul_reference

__all__ = ["Fp4MatmulConfig", "decode_tile", "default_config", "dequantize_reference", "fp4_matmul",
           "fp4_matmul_reference", "nibbles_to_f16_bits", "scale_bits_to_f32"]
