"""Running the model on one rank: the model runner (step inputs, forward, sampling, the ranks'
agreement on tokens), CUDA-graph decode steps, the checkpoint loader and the sampler.
"""
