"""Training: the one loop every result comes from (loop.fit) and what it needs.

  loop         fit: teacher training, KD, fine-tuning and scratch, with masks, AGP and resume
  objective    the loss's teacher and weights (alpha, temperature, attention transfer)
  losses       kd_loss (fine-tuning is alpha = 0) and at_loss; features: the activations attention transfer compares
  recovery     the distill variants (kd, finetune, scratch, scratch_kd): where each student starts, which loss
  runtime      threads, seeds, device, CUDA determinism, memory format
  resume       the fingerprint and RNG state of a resumable run
  distributed  torchrun / DDP: ranks, sharded batches, the relaunch
"""
