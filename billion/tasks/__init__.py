"""The tasks: what each command measures, written once for every engine.

A task takes a loaded Backend and its config dataclass and returns a result; it
knows nothing of click, the terminal or records (billion/runner.py does those).
"""
