"""Plain helpers the test modules share: data generators, build settings, oracles.

Fixtures live in the conftest.py files; the functions and constants they and the test modules share
live here. A test module never imports another test module (tests/test_test_layout.py checks it).
"""
