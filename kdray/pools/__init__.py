"""Model pools on Ray Data: generators answer prompts, scorers record the teacher's signal.

:mod:`.base` (sampling, environment, output rows, backend dispatch), :mod:`.vllm` and
:mod:`.hf` (the two backends), :mod:`.run` (mapping rows through a pool).
"""

from kdray.pools.base import SamplingConfig, pool_env
from kdray.pools.run import generate, generate_dataset, map_pool, pool_class, score_dataset

__all__ = ["SamplingConfig", "generate", "generate_dataset", "map_pool", "pool_class", "pool_env", "score_dataset"]
