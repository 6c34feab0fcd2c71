"""perception: the study's library (models, ops, datasets, evaluation maths). No ray, mlflow or dvc here."""

__version__ = "0.1.0"
