"""fashion-tagger: a multi-attribute product tagger and the stages that build, train and register it."""

__version__ = "0.1.0"
