"""Stage 4, scoring: the official normalized error, ``evaluate.py`` and ``fashionkp report``."""
