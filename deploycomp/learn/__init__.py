"""Learning substrate: data, training, evaluation, distillation from stored teacher logits.

The compiler needs accuracy numbers it can trust (before/after pruning and token rewriting) and a
way to recover accuracy (fine-tuning with distillation). Everything here runs on CPU with plain
torch, single-process or under ``torchrun`` (DistributedDataParallel).
"""
