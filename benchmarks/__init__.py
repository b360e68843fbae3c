"""properlm's performance benchmarks (not part of the test suite).

    make bench          # the documented numbers, embedded SmolLM2-135M (~15 min)
    make bench-check    # the same, exiting non-zero when a ratio misses its target
    .venv/bin/python -m benchmarks.run --quick   # tiny random model, < 1 minute

See ``docs/benchmarks.md`` for what each benchmark measures and the results.
"""
