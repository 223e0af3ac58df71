"""The engine core: the step loop and its recovery (engine_core, recovery), the contract it
drives a backend through (backend), and the native backend's scheduling: the scheduler, the KV
cache's block bookkeeping and the sequences (pure Python: they import no torch).
"""
