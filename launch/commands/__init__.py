"""The `pretrain` sub-commands that drive the launchers (run, rehearse); launch/cli.py lists every command."""
