"""The Ray side of the train stage: the search space, the trainable, the Tune session (storage, restore,
reuse of workers), the trials table and the live status line.

May import: base.
"""
