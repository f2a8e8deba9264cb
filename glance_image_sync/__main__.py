"""``python -m glance_image_sync``: the ``glance-image-sync`` command."""

import sys

from glance_image_sync.cmd import main

sys.exit(main())
