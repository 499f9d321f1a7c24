"""The files esd reads and writes: run records (atomic writes, the environment), weight files, the prompt
CSV, the generation record, evaluation summaries, and the LoRA / single-file / diffusers writers. Imports
only esd.core and esd.families."""
