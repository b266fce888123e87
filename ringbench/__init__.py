"""ringbench: benchmark attention implementations for long context.

Importing the package stays light (no torch): the report side must run where
torch is not installed.
"""

__version__ = "0.1.0"
