"""Evaluation tasks for `blt eval`: per-byte scoring (bits per byte, log-likelihoods), multiple choice,
translation from the machine's gettext catalogs, HumanEval code generation and held-out continuation.

Kept free of imports: nothing here pulls in JAX before a task module is imported."""
