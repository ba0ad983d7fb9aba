"""The benchmark harness (see bench/README.md); `python3 bench/run.py` is its command line.

A package so that its modules import each other one way (``from bench import harness``),
whether run as scripts from the repository or imported by the smoke test.
"""
