"""The model families (SD 1.x/2.x, SDXL, SD3, FLUX): loading from each source (hub id, folder, single
file), prompt encoding, the call of the denoiser, schedulers and single-file layouts. Imports only esd.core."""
