"""Entry point of the MONAI Application Package: the packager runs ``python3 /opt/holoscan/app``.

The one-shot mode then reads ``HOLOSCAN_INPUT_PATH``, ``HOLOSCAN_OUTPUT_PATH``,
``HOLOSCAN_MODEL_PATH``, ``HOLOSCAN_WORKDIR`` and ``HOLOSCAN_CONFIG_PATH`` (this
package's ``app.yaml``); oncopacs's packages (app, operators, ml) are in
``/opt/holoscan/lib``, which the packager puts on ``PYTHONPATH`` (``--add``).
"""

import sys

from app.oneshot_cmd import main

sys.exit(main(sys.argv[1:]))
