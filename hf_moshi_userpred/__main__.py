"""`python -m hf_moshi_userpred COMMAND ...` (e.g. under `accelerate launch -m hf_moshi_userpred train ...`)."""

import sys

from .cli.main import main

__all__: list[str] = []  # a script: nothing to import

sys.exit(main())
