import atexit
import os
import shutil
import tempfile

# Compiling is most of this suite's time on a CPU (the tiny models run in microseconds). LLVM at -O0 compiles
# the same programs ~30% faster (one engine's warm-up, 2 cores: 55 -> 39 s of XLA compilation) and computes the
# same float arithmetic (XLA's CPU backend has no fast-math either way). Not on a GPU machine, where the flag
# would also reach the GPU compiler and tests/gpu run kernels at speed. Set before jax starts its backends;
# subprocesses inherit it.
if not os.path.exists("/dev/nvidiactl") and "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

import jax  # noqa: E402

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
# scripts/test.sh runs the modules in worker processes that share this cache. Without a size limit jax writes an
# entry unlocked, so a worker may read one that another is still writing: the truncated compressed entry fails to
# decompress and jax compiles the program again (a warning, no wrong program). A size limit would take a file lock,
# but also scan the whole directory on every write: the suite took 1744 s instead of 1034 on 2 cores.
