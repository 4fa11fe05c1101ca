"""Evaluation harnesses: retrieval metrics, BEIR-format retrieval (ViDoRe-v2), offline stand-ins."""
