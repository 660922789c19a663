"""`python -m dpbench ...` is the same as the `dpbench` command."""

import sys

from dpbench.workbench.cli import main

sys.exit(main())
