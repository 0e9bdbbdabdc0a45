"""catstream's core: the types and mechanics every stage shares, and nothing above them.

Schemas (offers, predictions, dead letters), settings, text, tokenizer, images, the featuriser,
the model and its bundle, the shared-memory queue, the decision rule, the served-model scorer,
Kafka helpers, the embedded broker and the model registry lookup. It imports no stage package
(``producers``, ``preprocess_workers``, ``gpu_workers``, ``training``) and no entry point
(``catstream``). Importing this package imports nothing: each module is imported on its own, so
serving never loads torch (``core.model``) unless it asks for it.
"""

__all__: list[str] = []
