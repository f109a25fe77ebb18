"""The training machinery that train_dist.py tells the story with; docs/training.md has a table of
its modules.

Nothing is imported here: `densenet.training.config` must load without torch, so that the command
line and --help are answered at once.
"""
