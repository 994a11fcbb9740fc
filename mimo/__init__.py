"""mimo: the MiMo recipe for small language models that reason above their weight."""

__version__ = "0.1.0"
