import jax

# fp32 parity on a GPU needs full-precision matmuls (TF32 is the default there); on the CPU this is a no-op.
jax.config.update("jax_default_matmul_precision", "highest")
