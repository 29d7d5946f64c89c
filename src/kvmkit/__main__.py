"""`python -m kvmkit` runs the command line."""

import sys

from kvmkit.cli.main import main

sys.exit(main())
