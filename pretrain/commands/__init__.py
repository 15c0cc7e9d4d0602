"""The `pretrain` sub-commands that need only this package (consolidate, export, estimate-memory, data, shards);
launch/cli.py lists every command."""
