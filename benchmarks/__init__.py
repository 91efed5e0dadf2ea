"""The benchmark scripts, a package so that they share code by import (``benchmarks.results_file``)
and the tests can use theirs (``benchmarks.reconstruct``). Run each from the repository root:

    .venv/bin/python -m benchmarks.zoo --quick
"""
