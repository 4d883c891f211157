"""`python -m transformer_lens_patching ioi ...`: the same as `tl-patch` (and `python -m tl_patch`)."""

import sys

from tl_patch import main

sys.exit(main())
