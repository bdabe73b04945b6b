"""The algorithm: CKA, adapter units, threshold schedule, freezing policy, decision strategies, the
freezer and its state. Imports torch (PEFT is looked up, not imported); knows nothing about any
training loop, memory measurement or command line."""
