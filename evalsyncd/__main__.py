"""``python -m evalsyncd``: the command line."""

from evalsyncd.cli import entrypoint

entrypoint()
