"""The test suite, a package: its shared code is imported as ``tests.helpers.*`` (pytest puts the
repository root on ``sys.path`` for a package of tests; nothing here edits it)."""
