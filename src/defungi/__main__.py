"""`python -m defungi` (and `torchrun -m defungi train ...`): the defungi command."""

import sys

from defungi.cli import main

sys.exit(main())
