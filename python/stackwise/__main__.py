"""``python -m stackwise``: the ``stackwise`` command."""

import sys

from stackwise.cli import main

sys.exit(main())
