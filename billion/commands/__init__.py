"""One module per CLI command: its options, a task call through billion/runner.py, its table.

Command modules import mlx/torch-facing code only inside the command body, so `billion --help`
stays fast and works with an engine missing; they never import each other (shared options are in
billion/options.py, terminal helpers in billion/ui.py).
"""
