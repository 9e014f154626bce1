"""Training: hyperparameters (SageMaker's and detforge's), the dataset and its transforms, mosaic and the
rest of the small-data recipe, the optimizers, the loop (``engine``), the run (``train``: checkpoints,
resume, metrics, torchrun), and ``metrics.png``. The models themselves are in ``detforge.models``."""
