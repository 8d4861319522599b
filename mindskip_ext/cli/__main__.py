"""``python -m mindskip_ext.cli`` is the ``mindskip`` command."""

import sys

from . import main

sys.exit(main())
