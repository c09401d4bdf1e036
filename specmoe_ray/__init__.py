"""specmoe-ray: lossless speculative decoding for Mixture-of-Experts models, served on Ray."""

from specmoe_ray.engine.engine import Engine
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
    "Engine",
    "RequestError",
    "RequestOutput",
    "SamplingParams",
    "ShardGroupError",
    "ShardStartupError",
    "SpecMoEError",
    "UnsupportedArchitectureError",
]
__version__ = "0.1.0"
