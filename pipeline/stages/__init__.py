"""One module per DVC stage (`python -m pipeline <stage>`): arguments in, the work of the packages, outputs
out. A stage never imports another stage.

May import: base, training, tracking, evaluation, reporting.
"""
