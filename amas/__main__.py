"""`python -m amas` and `torchrun -m amas`: the amas command."""

import sys

from amas.cli import main

sys.exit(main())
