"""properlm: progressive personalization of LLMs (PROPER) for many users at once.

Layout: ``data`` (loading users' histories) -> ``model`` (base model, group
experts, routers, batched per-user LoRA) -> ``train`` (one entry per stage) ->
``evaluate`` (metrics, baselines, reports). The CLI in ``cli`` is a thin table
over these public functions.
"""

__version__ = "0.1.0"


def load_run(run_dir):
    """Load a trained run for personalized generation (see :mod:`properlm.api`)."""
    from properlm.api import load_run as _load

    return _load(run_dir)
