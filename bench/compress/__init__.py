"""Family toolkits: the machinery several methods of one family share, so that a method plug-in (methods/) never
imports another one.

- `hessian`: the block-wise Hessian (OBS/GPTQ) machinery: per-block input Hessians, the calibration schedule, the
  inverse-Hessian factor and GPTQ's column sweep (gptq, sparsegpt, wanda, billm, pbllm, baq).
- `gptq`: GPTQ's integer grid on that sweep, one layer's stored tensors and their restore (gptq, layerwise_bits).
- `static_ptq`: per-channel integer weights with calibrated static activation ranges (static_ptq, hawq_v3,
  minifloat, qdiffusion).
- `rtn`: round-to-nearest integer weights with optional dynamic activation quantization (rtn, awq, smoothquant;
  its stored grid and per-layer restore also layerwise_bits and nupes), and the norm rescaling that moves a factor
  between a norm and the linears reading it.
- `sign`: sign binarization with a per-row scale (sign, xnor).
- `sparsity`: weight-pruning patterns, masks and the stored sparse form (magnitude, wanda, sparsegpt).
- `depth`: removal of whole decoder blocks (shortgpt, sleb, foldgpt), and ShortGPT's block influence (also
  layerwise_bits, which ranks blocks by it).
- `distill`: knowledge distillation from the uncompressed model on bench.training's loop (binarymos, onebit, dbllm,
  l4q, edgeqat, foldgpt, token_pruning, and recover=).
- `binary_conv`: binary convolutions with binary activations, real-valued shortcuts and their distillation
  (birealnet, biper).

The recovery stage (bench/recover.py) and the training loop with its convergence record (bench/training.py) stay
in the core: they are axes and machinery of every run (recover=, suite-trained models), not one family's.
"""
