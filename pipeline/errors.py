"""The errors a stage reports as one line (exit 2), importable without loading any stage."""


class DataError(RuntimeError):
    """The data cannot make a dataset (e.g. a class with no usable mesh); the message says which and why."""


class TrainingError(RuntimeError):
    """The Tune run did not produce a trained model for every variant."""
