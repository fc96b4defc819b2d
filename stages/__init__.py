"""The DVC stages, one module each (``python -m stages.<name>``); see dvc.yaml."""
from kdprune import envcheck

envcheck.require()  # before any stage imports torch: a python without the venv gets one clear line
