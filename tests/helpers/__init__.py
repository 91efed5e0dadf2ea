"""Code the tests share, each piece written once: small models (``tiny_models``, ``graph_models``),
synthetic data (``finetune_data``), the in-process CLI runner (``cli``), forwards and subprocesses
(``running``). Fixtures live in ``tests/conftest.py``; weights that look trained and the checks
that blocks run come from the library (``attn_inject.testing``)."""
