"""`python -m migshark`: the same entry point as the `migshark` console script."""

from migshark.analyzer.cli import run

if __name__ == "__main__":
    run()
