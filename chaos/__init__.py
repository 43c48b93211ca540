"""Faults under load (issue #20 part 1): `python -m chaos [--smoke]`, see chaos/README.md."""
