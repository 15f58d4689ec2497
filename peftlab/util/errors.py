"""Exception types. Every message says what was wrong and what is valid."""


class PeftlabError(Exception):
    """Base class of every peftlab error."""


class ConfigError(PeftlabError, ValueError):
    """A config field, key or method name is invalid."""


class TargetError(PeftlabError, ValueError):
    """Target modules could not be resolved on this model."""


class MergeError(PeftlabError, RuntimeError):
    """Merging or unmerging is impossible in the current state."""


class AdapterFileError(PeftlabError, ValueError):
    """An adapter on disk is missing, corrupt, truncated or does not fit the base model."""


class WrapError(PeftlabError, RuntimeError):
    """The model is not wrapped, or is already wrapped with this adapter name."""
