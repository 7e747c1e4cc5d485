"""`python -m hf_moshi_userpred COMMAND ...` (e.g. under `accelerate launch -m hf_moshi_userpred train ...`)."""

import sys

from .cli import main

sys.exit(main())
