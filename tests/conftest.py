"""Shared test setup: the Triton interpreter (no GPU here) and hypothesis profiles."""

import os

# Must be set before any module decorates a @triton.jit kernel.
os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import settings  # noqa: E402

settings.register_profile("ci", max_examples=8, deadline=None)
settings.register_profile("dev", max_examples=50, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
