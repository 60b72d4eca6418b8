"""Evaluation: a checkpoint's held-out perplexity, sample metrics, reference LMs (gen-PPL, MAUVE),
the HumanEval harness and offline judges."""
