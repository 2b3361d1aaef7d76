"""`python -m ctal_hf.export`: the `ctal-export` command (see `ctal_hf.export_cli`)."""

import sys

from ..export_cli import main

sys.exit(main())
