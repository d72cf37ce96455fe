"""``python -m app`` runs the oncopacs command line, or the one-shot mode when started
the MONAI Application Package way (``-i IN -o OUT [-m MODELS]``, or no arguments with
``HOLOSCAN_INPUT_PATH`` set)."""

import sys

from app.oneshot_cmd import is_oneshot_argv

if is_oneshot_argv(sys.argv[1:]):
    from app.oneshot_cmd import main as oneshot_main

    sys.exit(oneshot_main(sys.argv[1:]))
else:
    from app.cli import main

    sys.exit(main())
