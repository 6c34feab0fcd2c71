"""From trained checkpoints to typed evidence: what the evaluate stage measures, the intervals and effects
it computes, the rules that turn evidence into verdicts and decisions, and the typed results files.

- `measurements`: the checkpoints on every test set (per sample, per seed), and their deployment cost.
- `evidence`: estimates with intervals, the claims' typed evidence, the deployment table.
- `metric_names`: the test metrics' names, shared by every model's run.
- `verdicts`: a verdict per claim, by stated rules; `decision`: which backbone, by stated rules.
- `results`: `results.json`, `verdicts.json` and `decision.json` as pydantic contracts.

May import: base.
"""
