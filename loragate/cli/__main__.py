"""``python -m loragate.cli``: the ``loragate`` command."""

import sys

from loragate.cli import main

sys.exit(main())
