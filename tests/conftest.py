import os

# Tests run on the CPU in float32, the library's default; a forced device count for the
# multi-device tests is set per test process where needed.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
