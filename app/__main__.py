"""``python -m app`` runs the oncopacs command line."""

import sys

from app.cli import main

sys.exit(main())
