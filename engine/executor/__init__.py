"""Running the model on one rank: the model runner (step inputs, forward, sampling, the ranks'
agreement on tokens), CUDA graphs of decode steps and of mixed steps, the checkpoint loader,
the sampler, and what they read of a scheduled step (step.py).
"""
