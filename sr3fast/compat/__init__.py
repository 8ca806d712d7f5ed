"""Formats of other SR3 codebases (checkpoints, configs) mapped onto sr3fast's."""
