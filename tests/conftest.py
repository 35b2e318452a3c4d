"""Shared test setup: CPU only, small shapes."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
