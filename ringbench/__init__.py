"""ringbench: benchmark attention implementations for long context.

What a plugin needs is here: ``from ringbench import Bench, Option, Problem, register``.
Importing the package stays light (no torch): the report side must run where
torch is not installed.
"""

__version__ = "0.1.0"

from ringbench.attention.registry import Bench, Option, Problem, register  # noqa: E402  (the plugin API)

__all__ = ["Bench", "Option", "Problem", "register", "__version__"]
