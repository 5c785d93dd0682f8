import os
import warnings

# Megatron-Core warns at import that TE/apex are absent; that is the CPU path by design.
warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
warnings.filterwarnings("ignore", message="Apex is not installed.*")
os.environ.setdefault("OMP_NUM_THREADS", "1")
