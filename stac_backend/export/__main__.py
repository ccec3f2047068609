"""``python -m stac_backend.export`` = ``stac export`` (see ``command``)."""

import sys

from .command import main

sys.exit(main())
