"""dpbench: a reproducibility workbench for differentially private deep learning.

`import dpbench` needs only torch and numpy; heavier dependencies (pandas, papermill,
dp-accounting, timm, matplotlib) are imported inside the functions that use them.
"""

__version__ = "0.1.0"

import warnings as _warnings

# Progress bars are tqdm.auto's plain-text bars on stderr (no ipywidgets here): JupyterLab shows them
# in place and papermill keeps them in the executed notebook and its log. tqdm's advice to install
# ipywidgets would only turn them into widgets that the log cannot show, so it is not printed.
_warnings.filterwarnings("ignore", message="IProgress not found")
