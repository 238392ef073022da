"""``python -m trainer.cli``: the ``dora-studio`` command."""

import sys

from trainer.cli import main

sys.exit(main())
