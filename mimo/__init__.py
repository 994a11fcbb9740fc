"""mimo: the MiMo recipe for small language models that reason above their weight."""

import os

# OpenMP threads that spin-wait for a peer make torch collapse on a device where another program holds a core
# (a decode 5-7x slower; bench/busy_device.py): mimo's threads sleep while they wait unless the user says
# otherwise. Read by the OpenMP runtime when torch loads, so set before any torch import.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
