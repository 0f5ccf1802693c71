"""``nfsd-nerf batch``: many runs from one plan (prompts x variants x seeds), on Ray or in process.

* :mod:`.plan`: the plan file, checked and expanded into runs before anything is written.
* :mod:`.folders`: what each run's fixed folder already holds (nothing, done, resumable, stale).
* :mod:`.worker`: one worker process training runs one after another with its prior kept loaded.
* :mod:`.ray_pool`: workers as Ray actors (local instance or a cluster), interrupts, lost workers.
* :mod:`.runner`: the scheduling loop, retries, Ctrl-C; the in-process fallback without Ray.
* :mod:`.report`: ``batch.json``, ``results.csv`` and the live table.

Importing this package loads neither torch nor Ray.
"""

from .plan import BatchPlan, RunSpec, load_plan
from .report import print_result
from .runner import BatchInterrupted, BatchResult, run_batch

__all__ = ["BatchInterrupted", "BatchPlan", "BatchResult", "RunSpec", "load_plan", "print_result", "run_batch"]
