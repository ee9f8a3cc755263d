"""`python -m bnexport` runs the CLI."""

from bnexport.cli.app import main

main()
