"""The training machinery that train_dist.py tells the story with: the typed config and its
parsing (config), the process group and collectives (distributed), the trainer and evaluation
(engine), optimizers and the lr schedule (optim), checkpoint files (checkpoint), stop signals and
exit statuses (signals), console and run-folder logs (metrics_log) and the W&B run (wandb_run).

Nothing is imported here: `densenet.training.config` must load without torch, so that the command
line and --help are answered at once.
"""
