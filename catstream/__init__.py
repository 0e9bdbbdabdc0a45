"""catstream's entry points, the top layer: the ``catstream`` command (``catstream.cli``), the demo,
the node supervisor behind ``catstream run`` and its health server.

Below them, the pipeline's stages (``producers`` → ``preprocess_workers`` → shared-memory queue →
``gpu_workers``; ``training`` writes the model bundle they load) and, under those, ``core``: the
types and mechanics every stage shares. Imports point down only.
"""

__all__: list[str] = []
