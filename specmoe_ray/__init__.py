"""specmoe-ray: lossless speculative decoding for Mixture-of-Experts models, served on Ray."""

from specmoe_ray.config import ConfigError, ServeConfig
from specmoe_ray.engine.engine import Engine
from specmoe_ray.engine.sequence import RequestOutput, SamplingParams
from specmoe_ray.engine.setup import EngineConfig
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
