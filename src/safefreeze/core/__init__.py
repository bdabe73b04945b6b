"""The algorithm: CKA, adapter units, threshold schedule, freezing policy, the freezer and its
accounting. Imports torch and PEFT only; knows nothing about any training loop."""
