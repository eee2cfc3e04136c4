# The Python package's version. It must equal the C library's oscar_version();
# oscar/__init__.py checks this at import time.
__version__ = "0.2.0"
