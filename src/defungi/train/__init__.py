"""Training and what a fit leaves: the epoch loop, callbacks, the frozen pass, the refusal detector, the
trust checks, and the checkpoints with the model loaded from them."""
