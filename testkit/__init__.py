"""Helpers shared by the tests, the benchmarks and the capture scripts.

Not part of the installed product: tests/conftest.py and the scripts under bench/
and captures/ put the repository root on sys.path, which is how this package is
found. Test modules import helpers from here and never from each other, so that a
test file can be renamed, split or deleted without breaking another.
"""
