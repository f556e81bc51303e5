"""``python -m prefork``: the same as the ``prefork`` command."""

from prefork.cli import run

if __name__ == "__main__":
    run()
