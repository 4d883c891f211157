"""`python -m transformer_lens_patching ioi ...`: the same as `tl-patch`."""

import sys

from .cli import main

sys.exit(main())
