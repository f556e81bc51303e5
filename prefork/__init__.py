"""prefork: a prefork TCP server with a Cython hot loop and a pure-Python twin."""

__version__ = "0.1.0"

__all__ = ["__version__"]
