"""properlm's server: an OpenAI-compatible HTTP API over a trained run, for every user at once.

- ``settings``: :class:`ServeConfig`, the server's documented settings;
- ``protocol``: the wire format (OpenAI request/response objects, errors) as pydantic models;
- ``engine``: continuous batching of many users' requests in mixed-user forward passes;
- ``keys``: the admin key and per-user API keys, stored as salted hashes;
- ``jobs``: onboarding (a user's history uploaded, their LoRA trained in the background);
- ``middleware``: the body limit, the access log, errors no route handled;
- ``app``: the FastAPI application and its routes.

The command ``properlm serve`` is :mod:`properlm.serving`, which hands the server the run
operations above this layer (loading a run, forgetting users): nothing here imports them.
"""
