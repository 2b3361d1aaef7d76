"""`python -m ctal_hf.demo --model ...`: the `ctal-demo` command."""

import sys

from .cli import main

sys.exit(main())
