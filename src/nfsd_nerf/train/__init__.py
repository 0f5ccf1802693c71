"""Text-to-NeRF optimisation.

* :mod:`.schedules`: what changes with the step (levels, shading, loss weights, refreshes).
* :mod:`.losses`: the regularisers.
* :mod:`.step`: :class:`Trainer`, one run's state and one step in the order of the data flow.
* :mod:`.run_folder`: what a run writes (config, metrics, previews, summary).
* :mod:`.run`: :func:`run_training`, the ``train`` command as numbered stages.
"""

from .run import Interrupted, RunResult, TrainingDiverged, run_training
from .step import StepResult, Trainer

__all__ = ["Interrupted", "RunResult", "StepResult", "Trainer", "TrainingDiverged", "run_training"]
