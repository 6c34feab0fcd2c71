"""One module per `dvc.yaml` stage: read the validated config, call the library, write declared outputs."""
