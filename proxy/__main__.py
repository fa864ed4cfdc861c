"""`python -m proxy` is `canary-proxy`."""

import sys

from proxy.cli import main

sys.exit(main())
