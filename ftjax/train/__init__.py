"""Training: one pure step and one explicit loop per algorithm; shared pieces in common.py."""
