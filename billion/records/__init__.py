"""Records: one JSON schema for every task (store.py), and the report rendered from records only (report.py)."""
