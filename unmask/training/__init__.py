"""Training: objectives (MDLM, BD3-LM, AR, SFT, R2FT), the training loop, the perplexity estimator
it validates with, and post-training (SFT/R2FT runs, ADJUST trajectories and sampler)."""
