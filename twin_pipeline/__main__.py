"""``python -m twin_pipeline`` is the ``twin`` command."""

from __future__ import annotations

import sys

from twin_pipeline.cli import main

sys.exit(main())
