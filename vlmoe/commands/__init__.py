"""Argument parsers of the light ``vlmoe`` subcommands (``data``, ``export``).

Each module parses its arguments before importing torch, so ``--help`` and usage errors answer at
once; the work is done by the package modules they call.
"""
