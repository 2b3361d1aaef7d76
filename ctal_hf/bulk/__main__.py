"""`python -m ctal_hf.bulk` (and `accelerate launch -m ctal_hf.bulk`, `torchrun -m ctal_hf.bulk`): `ctal-predict-bulk`."""

import sys

from .cli import main

sys.exit(main())
