"""migshark: a Wireshark-style analyzer for QEMU live-migration streams.

The subpackages live in the repository's top-level folders (`analyzer/`,
`dissectors/`, `tui/`); setuptools maps them under this package when installing,
and the links beside this file give a checkout the same import names.
"""

# The one place the version is written: pyproject.toml reads it from here, and a
# literal costs nothing at start-up (importlib.metadata would, on every command).
__version__ = "0.2.0"
