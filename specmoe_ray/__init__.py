"""specmoe-ray: lossless speculative decoding for Mixture-of-Experts models, served on Ray."""

from specmoe_ray.config import ConfigError, ServeConfig
from specmoe_ray.engine.engine import Engine, EngineConfig
from specmoe_ray.engine.sequence import RequestOutput, SamplingParams
from specmoe_ray.errors import (
    CheckpointError,
    RequestError,
    ShardGroupError,
    ShardStartupError,
    SpecMoEError,
    UnsupportedArchitectureError,
)

__all__ = [
    "CheckpointError",
    "ConfigError",
    "Engine",
    "EngineConfig",
    "ServeConfig",
    "RequestError",
    "RequestOutput",
    "SamplingParams",
    "ShardGroupError",
    "ShardStartupError",
    "SpecMoEError",
    "UnsupportedArchitectureError",
]
__version__ = "0.1.0"
