"""Experiment sweeps (the MoBA paper's scaling, block-granularity and hybrid studies) and their charts."""
