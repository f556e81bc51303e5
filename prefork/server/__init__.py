"""The server: a master (``arbiter``) that binds, forks and supervises
workers (``workers/``), and the process plumbing they share.

Imports run one way: ``server`` uses the hot loop (``prefork.fastio``), the
settings and the errors; nothing at the package root imports ``server``
except the CLI, which starts it.
"""
