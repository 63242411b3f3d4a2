"""Test-session settings shared by every test folder. Helpers live in `random_models.py`."""

import torch

# Tiny models run fastest on one thread (and the tests then leave the other core free).
torch.set_num_threads(1)
