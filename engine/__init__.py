"""tideq's inference engine: knows nothing of Celery or Redis.

`Engine(config).submit(request) -> Future[Completion]`; a loop thread batches every live request
at each step. Importing this package does not import torch; `engine.engine` does.
"""

from engine.config import EngineConfig
from engine.request import Completion, Request, SamplingParams

__all__ = ["Completion", "EngineConfig", "Request", "SamplingParams"]
