"""The diffusion workload: UNet denoisers, samplers, image data, local training and the
flatness, exposure-bias, quantization and FID measurements (imports no flwr)."""
