"""``python -m properlm ...``: the same as the ``properlm`` command.

It is what launchers that start a module take, e.g.
``accelerate launch --num_processes 2 -m properlm train --all ...`` (docs/training.md).
"""

import sys

from properlm.cli import main

sys.exit(main())
