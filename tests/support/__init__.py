"""Test infrastructure shared by the test modules (not shipped with the package)."""
