"""Errors raised by adapt-runtime. Every one is an ``AdaptRuntimeError`` with a message that says what to do."""


class AdaptRuntimeError(Exception):
    """Base class of the runtime's errors."""


class ModelNotFoundError(AdaptRuntimeError, LookupError):
    """A model name that is neither an alias, a local directory nor a loadable hub id."""


class UnsupportedArchitectureError(AdaptRuntimeError, ValueError):
    """A model whose architecture has no entry in the patch table."""


class AlreadyPatchedError(AdaptRuntimeError, RuntimeError):
    """``patch`` called on a model that is already patched."""


class StateFileError(AdaptRuntimeError, ValueError):
    """A state file that is corrupt or does not match the runtime it is loaded into."""


class ContextOverflowError(AdaptRuntimeError, ValueError):
    """A forward that would grow a state's KV cache past the model's maximum length."""


class MalformedStateError(StateFileError):
    """A state file that is damaged or holds values no run of this runtime produces (the server answers 400)."""


class IncompatibleStateError(StateFileError):
    """A well-formed state file written for another model, rule, rule options or format (the server answers 409)."""
