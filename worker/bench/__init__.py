"""Benchmarks and capacity planning: ``contact-worker bench`` and ``contact-worker plan``.

scenario (TOML files) -> harness (processes: simulator, worker, baselines) -> report.
The arithmetic lives in pure modules: ``bounds`` (the limits), ``model`` (the capacity model),
``histogram`` (latency percentiles) and ``figures`` (what a run's numbers mean).
"""
