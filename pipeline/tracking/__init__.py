"""Everything that talks to MLflow: the tracking store, the study's parent run, the trials' runs, and what
the evaluate and report stages log for review. No module outside this package imports mlflow.

- `store`: which store (SQLite beside the repository, or a server), reachability, retries, the store lock.
- `review`: how the study reads in MLflow's UI (tags, dataset inputs, metric logging, links).
- `trials`: the Tune callback that gives every trial its own nested run.
- `parent_run`: the study's parent run, opened and finished by the train stage.
- `stage_logs`: what the evaluate and report stages log to those runs.

May import: base, evaluation, training.
"""
