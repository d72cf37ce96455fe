"""Exception hierarchy shared by every oncopacs package.

Each error names the thing that is wrong (a file, a UID, a field), never just
"invalid input".
"""


class OncopacsError(Exception):
    """Base class of every error oncopacs raises on purpose."""


class ConfigError(OncopacsError):
    """A configuration value or command-line argument is not acceptable."""


class SynthError(OncopacsError):
    """The synthetic cohort generator was asked for something it cannot make."""


class PeerError(OncopacsError):
    """A network peer (PACS, MLLP endpoint) refused or failed a request."""
