"""properlm: progressive personalization of LLMs (PROPER) for many users at once.

Layout: ``data`` (loading users' histories) -> ``model`` (base model, group
experts, routers, batched per-user LoRA) -> ``store`` (the user store, the run
directory) -> ``train`` (one entry per stage) -> ``evaluate`` (metrics,
baselines, reports) -> ``serve`` (the OpenAI-compatible server). The CLI in
``cli`` is a thin table over these public functions.
"""

__version__ = "0.1.0"


def load_run(run_dir, cache_mb: float = 1024, device: str | None = None):
    """Load a trained run for personalized generation (see :mod:`properlm.api`)."""
    from properlm.api import load_run as _load

    return _load(run_dir, cache_mb=cache_mb, device=device)
