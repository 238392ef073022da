"""Settings: the one typed schema, presets (TOML with ``base`` inheritance and ``--set``), and its docs.

Imports nothing heavy (no torch): reading a preset or listing settings is instant, and the studio's form
is built from the same schema.
"""
