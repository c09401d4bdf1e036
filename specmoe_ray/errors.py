"""Errors users see. Each message names what is wrong and where."""


class SpecMoEError(Exception):
    """Base class of every error this package raises on purpose."""


class CheckpointError(SpecMoEError):
    """A checkpoint directory is missing, incomplete or corrupt."""


class UnsupportedArchitectureError(CheckpointError):
    """The checkpoint's architecture (or one of its options) is not implemented."""


class ShardStartupError(SpecMoEError):
    """An expert shard failed to start, to load its experts, or to join the process group."""


class ShardGroupError(SpecMoEError):
    """The expert shard group failed while serving (a collective failed or timed out)."""


class RequestError(SpecMoEError, ValueError):
    """A request cannot be served as given (too long, bad token ids, ...)."""
