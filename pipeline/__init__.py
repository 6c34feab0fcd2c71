"""pipeline: the study's stages, configuration, orchestration (Ray Tune) and tracking (MLflow)."""
