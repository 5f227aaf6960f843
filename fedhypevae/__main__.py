"""`python -m fedhypevae ...`: the same command line as `fedhypevae ...`."""

import sys

from .cli import main

sys.exit(main())
