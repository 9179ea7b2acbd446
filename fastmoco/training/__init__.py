"""The run loop (loop.py) and what it is built from: the runtime's trainer and optimizers, the
schedules, the time budget and autosizer, the run's position, its state in checkpoints and the
periodic saves, the stop flag, the kNN monitor and the metrics."""
