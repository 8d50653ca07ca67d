"""The one error type the CLI turns into a one-line message and a non-zero exit."""


class KdpruneError(Exception):
    """A problem with the user's input or data, explained in one line that names the field or file."""


class TrainingDiverged(KdpruneError):
    """The loss became NaN or infinite; the message names the stage and epoch."""


class DownloadError(KdpruneError):
    """A download failed (network); the only error worth retrying."""
