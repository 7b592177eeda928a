"""`python -m flexunet` runs the `flexunet` command."""

import sys

from flexunet.cli import main

sys.exit(main())
