"""Training orchestration: the search space, the Ray Tune trial, MLflow tracking and the live status."""
