"""Subcommands of the ``bkn`` CLI (one module each)."""
