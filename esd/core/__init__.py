"""The method itself, independent of files, flags and model families: the ESD objective, prompt conditioning
and the guided sampler, the two views of the model, the x_t sources, the table of train methods, the
precision policy and the devices. Imports nothing else of esd."""
