"""`python -m defungi` (and `torchrun -m defungi train ...`): the defungi command."""

from defungi.cli import run

run()
