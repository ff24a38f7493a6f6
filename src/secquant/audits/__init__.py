"""Audits: attacks on a model or a claim, measured, never part of making a model. Membership inference
(loss attack, LiRA with shadow models), tests of DP claims (replay check, one-run canary audit),
adversarial robustness, the bit-flip attack, the float/quantized divergence test for
quantization-conditioned backdoors, and the yardstick corpora that score the PII masker."""
