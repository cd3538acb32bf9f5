"""Helpers for the cervical-spine CT fracture course (teaching only, not a medical device).

One module per concern; nothing heavy runs at import time. Import modules, not names::

    from cspine_utils import config, phantom
"""

__version__ = "0.1.0"
