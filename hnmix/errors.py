"""The errors a user can cause and fix. Each is reported as one line, without a traceback.

Programming errors are not wrapped: they keep their traceback.
"""


class HnmixError(Exception):
    """A problem with what the user asked for; the message says what was wrong and how to fix it."""


class ConfigError(HnmixError):
    """An option, a config file or a combination of options is invalid."""


class DataError(HnmixError):
    """The dataset cannot be found, reached or used (path, Hub id, split, columns, images)."""


class HubError(HnmixError):
    """The Hugging Face Hub cannot be used as asked (token, repo id, network)."""
