"""Where MLflow models registered before the library had subpackages find their class: their logged code says
`from fashion_tagger.pyfunc_model import TaggerModel`, and a process that has already imported this package
(the gate scoring an older champion, `predict --model`) resolves that name here, not in the model's own copy.
New models name `fashion_tagger.serving.pyfunc_model`; their exports (tagger.json, weights.pt) are the same format.
"""

from fashion_tagger.serving.pyfunc_model import TaggerModel

__all__ = ["TaggerModel"]
