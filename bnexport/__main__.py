"""`python -m bnexport` runs the CLI."""

import os
import sys

# `python -m` puts the working directory first on sys.path; like the console script, bnexport
# imports nothing from it (`--model` imports from it on its own terms: bnexport.source).
if sys.path and sys.path[0] in ("", os.getcwd()):
    del sys.path[0]

from bnexport.cli.app import main

main()
