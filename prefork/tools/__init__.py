"""The client-side tools: ``prefork bench`` (drives ``prefork.loadgen``),
``prefork client`` and ``prefork status``. They talk to a server over
sockets only, and import nothing from ``prefork.server``.
"""
