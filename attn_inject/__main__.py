"""``python -m attn_inject ...`` runs the command line (and ``torchrun ... -m attn_inject finetune ...``)."""

import sys

from .cli import main

sys.exit(main())
