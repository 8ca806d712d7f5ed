"""Triton kernels and their launchers (installed as sr3fast.kernels). No model knowledge here."""
