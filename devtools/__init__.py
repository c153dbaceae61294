"""Harnesses for the people who work on resfpn, not for its users: the GPU check (``make check-gpu``).

They drive the tools and the test suite as subprocesses and may import every package;
nothing in the library imports them.
"""
