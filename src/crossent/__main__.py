"""``python -m crossent bench``."""

import sys

from crossent.cli import main

sys.exit(main())
