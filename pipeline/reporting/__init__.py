"""What people read: the evaluation's figures, the DVC metrics and plot tables, the report's blocks as
Markdown and HTML, and the offline page `dvc plots show` fills.

May import: base, evaluation.
"""
