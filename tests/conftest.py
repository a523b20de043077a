import atexit
import os
import shutil
import tempfile

import jax

# fp32 parity on a GPU needs full-precision matmuls (TF32 is the default there); on the CPU this is a no-op.
jax.config.update("jax_default_matmul_precision", "highest")

# One persistent compilation cache for the whole run, subprocesses included (the sharding check, the server):
# many tests build engines of the same tiny models with the same buckets, and each engine's programs would
# otherwise compile again (measured on 2 cores: a second engine's warm-up 19.8 s without it, 6.7 s with it). A
# fresh directory per run, removed at exit, so nothing carries over between runs.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache_dir = tempfile.mkdtemp(prefix="qwenvl-jax-test-cache-")
    atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache_dir
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs",
                  float(os.environ.get("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", 0)))
jax.config.update("jax_persistent_cache_min_entry_size_bytes",
                  int(os.environ.get("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", 0)))
