"""One sacred Experiment per paper, over shared ingredients (``experiments.ingredients``) and one
training engine (``experiments.engine``)."""
import warnings

# sacred 0.8.7 imports pkg_resources, which setuptools deprecates loudly; the pin keeps it working.
warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)
