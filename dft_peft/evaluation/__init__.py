"""Evaluation: edit requests and their loaders, EasyEdit's metrics, and the §5.8 analysis of an edit file."""
