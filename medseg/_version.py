"""medseg's version, in one place: the package metadata (pyproject's dynamic version) and
``medseg.__version__`` both read it, and modules below the API import it from here rather than
from the package face."""

__version__ = "0.1.0"
