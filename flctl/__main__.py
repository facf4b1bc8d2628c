"""`python -m flctl` runs the CLI (handy where the entry point is not on PATH)."""

from flctl.cli.app import main

main()
