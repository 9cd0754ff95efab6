"""Only the optional C extension lives here; everything else is in pyproject.toml."""

from setuptools import Extension, setup

# optional=True: without a compiler or Python headers the install still succeeds and
# migshark runs the same loops in Python (analyzer/speedups.py picks), only slower.
setup(ext_modules=[
    Extension("migshark.analyzer._speedups", ["analyzer/_speedups.c"], optional=True),
])
